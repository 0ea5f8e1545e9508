"""A sweep's grid: its fields, their combinations, and which run together.

A grid is {'field': values}, e.g. {'synqt.token_nums': (1, 4, 16),
'optim.lr': (1e-3, 3e-3)}; every combination is a member, a run of its own
under <workdir>/<member_name>/. Members whose swept fields differ only in
the optimizer's settings and in their method's initial-value fields
(`methods.Registered.init_only`: SynQT's three scales) run the same program:
they share a `group_key` and are trained stacked (loop.train_together).
"""
import ast
import itertools
import json
from typing import Any

import ml_collections

from synqt_jax import errors
from synqt_jax.config import validation as config_validation
from synqt_jax.models import methods

# The reference's search (one combination chosen per VTAB-1k task).
REFERENCE_GRID = {'synqt.token_nums': (1, 4, 16),
                  'synqt.attn_scale': (0.1, 1.0), 'synqt.ffn_scale': (0.1, 1.0),
                  'synqt.feat_scale': (0.1, 1.0)}
# Optimizer fields that change the data stream or the run's length: not stacked.
OPTIM_SHARED = ('batch_size', 'epochs')


class SweepError(config_validation.ConfigError):
  """A grid or protocol that cannot run; the message says what to change."""


def parse_grid(specs) -> dict[str, tuple]:
  """{'field': values} from 'synqt.token_nums=1,4,16'-style strings.

  Values are Python literals (1, 0.1, 1e-3, True); anything else is a string.
  """
  grid = {}
  for spec in specs:
    field, sep, values = spec.partition('=')
    texts = [v.strip() for v in values.split(',')]
    if not (sep and field.strip() and all(texts)):
      raise SweepError(f'--grid {spec!r}: expected field=value,value,... with '
                       "no empty value, e.g. --grid 'synqt.token_nums=1,4,16'.")
    grid[field.strip()] = tuple(_literal(text) for text in texts)
  return grid


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def config_grid(config) -> dict[str, tuple]:
  """`config.sweep` ({'synqt': {'token_nums': [...]}} or flat names) as a grid."""
  def flatten(prefix, tree):
    for key, value in tree.items():
      name = f'{prefix}{key}'
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        yield from flatten(name + '.', value)
      else:
        yield name, tuple(value)
  sweep = config.get('sweep') or {}
  if isinstance(sweep, ml_collections.ConfigDict):
    sweep = sweep.to_dict()
  return dict(flatten('', sweep))


def check_grid(config, grid) -> None:
  """Raises SweepError for a field the members could not share a cache over,
  or a value the field does not take (before anything is written)."""
  method = config.method
  if not methods.registered(method).reads_cached_kv:
    raise SweepError(f'A sweep needs a method whose image path it can share '
                     f'{methods.CACHE_METHODS}; config.method is {method!r}.')
  for field, values in grid.items():
    section, _, name = field.rpartition('.')
    sweepable = (field == 'seed' or section == method or
                 (section == 'optim' and name not in OPTIM_SHARED))
    if not sweepable:
      raise SweepError(
          f'Cannot sweep {field}: the combinations share one data set, '
          'backbone, feature cache and number of steps; sweep over '
          f'optim.* (not {"/".join(OPTIM_SHARED)}), {method}.* or seed.')
    if section and name not in config[section]:
      raise SweepError(f'Cannot sweep {field}: config.{section} has no field '
                       f'{name!r} (fields: {sorted(config[section])}).')
    if not values or len(set(map(repr, values))) != len(values):
      raise SweepError(f'Sweep of {field}: give distinct values, got '
                       f'{list(values)}.')
    _check_types(config[section] if section else config, field, name, values)
  for name, (_, member) in member_configs(config, grid).items():
    try:
      config_validation.validate(member)
    except errors.UserError as e:
      raise SweepError(f'Combination {name} of the sweep: {e}') from None


def _check_types(section, field, name, values) -> None:
  """Raises SweepError for a value `section.name` cannot hold (a ConfigDict
  field keeps its type)."""
  scratch = section.copy_and_resolve_references()
  current = section[name]
  for value in values:
    try:
      scratch[name] = value
    except TypeError:
      raise SweepError(
          f'Sweep of {field}: {value!r} is not of type '
          f'{type(current).__name__}, as config.{field} (now {current!r}) is; '
          f"give values such as --grid '{field}={current!r},...'.") from None


def member_name(fields: dict) -> str:
  """'token_nums=4-attn_scale=0.1': the swept fields' last names and values."""
  return '-'.join(f'{k.rpartition(".")[2]}={v}' for k, v in fields.items())


def member_configs(config, grid) -> dict[str, tuple[dict, Any]]:
  """name -> (swept fields, config) of every combination of `grid`, in order."""
  members = {}
  for values in itertools.product(*grid.values()):
    fields = dict(zip(grid, values))
    member = config.copy_and_resolve_references()
    with member.unlocked():
      for field, value in fields.items():
        *parents, name = field.split('.')
        section = member
        for parent in parents:
          section = section[parent]
        section[name] = value
      if 'sweep' in member:
        del member['sweep']
    members[member_name(fields)] = fields, member
  return members


def group_key(config, grid) -> str:
  """What members must share to be stacked: every swept field but the stacked."""
  init_only = methods.registered(config.method).init_only
  shared = {}
  for field in grid:
    section, _, name = field.rpartition('.')
    stacked = ((section == 'optim' and name not in OPTIM_SHARED) or
               (section == config.method and name in init_only))
    if not stacked:
      shared[field] = config[section][name] if section else config[name]
  return json.dumps(shared, sort_keys=True)


def stacks(members, max_stack):
  """A group's `members`, in order, as stacks of at most `max_stack`."""
  return [members[i:i + max_stack] for i in range(0, len(members), max_stack)]
