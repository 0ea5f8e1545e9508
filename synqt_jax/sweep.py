"""A grid of SynQT and optimizer settings, trained in one pass over one feature cache.

SynQT's image path holds no trainable value and no setting of the grid: the
K/V of a training image are the same for every combination. `run` builds the
training split's feature cache once (`train.open_feature_cache`) and trains
every combination of the grid from it:

* Combinations that run the same program (same `token_nums`, dropout rates,
  seed, batch size and epochs: the `group_key`) are trained together: one
  pmapped step (`stacked_train_step`) computes all their gradients in one
  `jax.vmap` of `train.gradients` over their stacked parameters, RNG keys and
  steps, then applies each one's own optimizer (AdamW state, learning-rate
  schedule, weight decay) with `train.apply_update`. The learning rate, the
  optimizer's settings and SynQT's three scales (learnable parameters' initial
  values) differ freely within a group. A group larger than `max_stack`
  trains as several stacks; stacks run one after another on the same cache.
* Each combination is a run of its own under `<workdir>/<name>/`: config.json,
  checkpoints/ (its own `train.TrainState`, as a single run saves it),
  metrics.jsonl, deferred_eval/, results.json and export.npz.
* Evaluation is deferred: every combination's evaluation points are scored at
  the end with one backbone pass per split (`deferred_eval.evaluate_each`).
* Resume: a group restores every member at the newest step all of them hold
  (checkpoints after it are deleted and trained again, bit-identically), so a
  sweep killed anywhere, even between two members' saves, resumes exactly.
* `<workdir>/results.json` holds a row per combination, the chosen one and
  the protocol that chose it; `summary.txt` and `accuracy.png` show them.

Protocols (`select_on`): 'test' is the reference's habit (the best of the
test evaluations over every combination: optimistic, labelled as chosen on
test). A validation split (`HELD_OUT`: 'val200' for VTAB-1k, 'val' for FGVC)
is the held-out protocol: train every combination on the split without it,
choose on it, retrain the chosen one on the union and report test once.
"""
import ast
import contextlib
import dataclasses
import functools
import itertools
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from synqt_jax import config_validation
from synqt_jax import deferred_eval
from synqt_jax import host_memory
from synqt_jax import methods
from synqt_jax import metrics_log
from synqt_jax import nonfinite
from synqt_jax import train
from synqt_jax import workdir as workdir_lib

# The reference's search (one combination chosen per VTAB-1k task).
REFERENCE_GRID = {'synqt.token_nums': (1, 4, 16),
                  'synqt.attn_scale': (0.1, 1.0), 'synqt.ffn_scale': (0.1, 1.0),
                  'synqt.feat_scale': (0.1, 1.0)}
# Method fields that only set the initial trainable values (SynQT's scales are
# learnable parameters initialised to them): members differing only in these
# (and in the optimizer's settings) run the same program, so they stack.
INIT_ONLY = {'synqt': ('attn_scale', 'ffn_scale', 'feat_scale')}
# Optimizer fields that change the data stream or the run's length: not stacked.
OPTIM_SHARED = ('batch_size', 'epochs')
# Validation split -> (the split without it, the split with it).
HELD_OUT = {'val200': ('train800', 'train800val200'),
            'val': ('train', 'train+val')}
SELECT_ON = ('test', *HELD_OUT)
# Members per compiled step: XLA's compile of a step grows with the stack (8
# stacked ViT-B/16 members at T = 4 ran out of a 24 GB CPU host while
# compiling; 4 compiled); larger groups train as several stacks in turn.
MAX_STACK = 4


class SweepError(config_validation.ConfigError):
  """A grid or protocol that cannot run; the message says what to change."""


# --- The grid. ---

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
    except config_validation.ConfigError as e:
      raise SweepError(f'Combination {name} of the sweep: {e}') from e


def _check_types(section, field, name, values) -> None:
  """Raises SweepError for a value `section.name` cannot hold (its type)."""
  scratch = section.copy_and_resolve_references()
  current = section[name]
  for value in values:
    try:
      scratch[name] = value
    except TypeError as e:
      raise SweepError(
          f'Sweep of {field}: {value!r} is not of type '
          f'{type(current).__name__}, as config.{field} (now {current!r}) is; '
          f"give values such as --grid '{field}={current!r},...'.") from e


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
  init_only = INIT_ONLY.get(config.method, ())
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


# --- One training step for a group. ---

def stacked_train_step(states, frozen, batch, learning_rate_fns):
  """One update of every member (under pmap, axis 'batch'); returns (states, metrics).

  The members' gradients come from one `jax.vmap` of `train.gradients` over
  their stacked parameters, keys and steps (the batch and the frozen
  backbone are shared); each member's own optimizer then applies its own.
  """
  method = states[0].method  # The group's program; the scales live in params.
  stacked = jax.tree.map(lambda *x: jnp.stack(x),
                         *[(s.params, s.rng, s.step) for s in states])
  losses, grads = jax.vmap(functools.partial(train.gradients, method),
                           in_axes=(0, 0, 0, None, None))(*stacked, frozen,
                                                          batch)
  updated = [train.apply_update(state, losses[i],
                                jax.tree.map(lambda g, i=i: g[i], grads), fn)
             for i, (state, fn) in enumerate(zip(states, learning_rate_fns))]
  return tuple(s for s, _ in updated), tuple(m for _, m in updated)


# --- Members. ---

@dataclasses.dataclass
class Member:
  """One combination: its run directory, config, optimizer and state."""
  name: str
  workdir: str
  config: ml_collections.ConfigDict
  schedule: Any
  state: train.TrainState  # Host copy: initial, restored, then final.
  evaluator: train.Evaluator | None = None


def create_member(name, config, workdir, vit, frozen, data):
  member_dir = os.path.join(workdir, name)
  config = train.validated(config, member_dir)
  os.makedirs(member_dir, exist_ok=True)
  train.prepare_run(config, member_dir)
  method = methods.from_config(config, vit)
  schedule = train.learning_rate_schedule(config.optim, data.steps_per_epoch)
  state = train.create_train_state(
      method, frozen, train.create_optimizer(config.optim, schedule),
      config.seed, config.data.image_size)
  return Member(name, member_dir, config, schedule, state)


def restore_together(checkpointings, members):
  """(states, histories) of every member at the newest step all of them hold."""
  restored = [c.restore(m.state) for c, m in zip(checkpointings, members)]
  steps = {int(s.step) for s, _ in restored}
  while len(steps) > 1:
    logging.info('Members saved at steps %s; resuming all at step %d.',
                 sorted(steps), min(steps))
    restored = [c.restore(m.state, at_most=min(steps))
                for c, m in zip(checkpointings, members)]
    steps = {int(s.step) for s, _ in restored}
  return [s for s, _ in restored], [h for _, h in restored]


def train_group(members, stack, *, workdir, frozen, p_frozen, data, cache,
                preemption, group_index, num_groups) -> bool:
  """Trains one group (or resumes it); False if preempted.

  Leaves each member's final state and its (deferred) evaluator, whose log
  stays open in `stack` until the sweep's joint evaluation.
  """
  config = members[0].config
  method = members[0].state.method
  checkpointings = [stack.enter_context(train.Checkpointing(
      m.config, m.workdir, data.total_steps, m.schedule)) for m in members]
  states, histories = restore_together(checkpointings, members)
  start_step = int(states[0].step)
  logs = [stack.enter_context(contextlib.closing(metrics_log.MetricsLog(
      m.workdir, start_step, m.config.tensorboard))) for m in members]
  for member, log, history in zip(members, logs, histories):
    member.evaluator = train.DeferredEvaluator(
        member.config, member.workdir, method, p_frozen, data, log, history)
  if start_step == data.total_steps:
    for member, state in zip(members, states):
      member.state = state
    return True
  logging.info('Group %d of %d: %s (%d combinations stacked), from step %d.',
               group_index + 1, num_groups, [m.name for m in members],
               len(members), start_step)
  with contextlib.ExitStack() as loop:
    batches = loop.enter_context(contextlib.closing(train.open_train_batches(
        config, workdir, method, frozen, p_frozen, data, start_step, cache)))
    step_metrics = [loop.enter_context(contextlib.closing(
        metrics_log.StepMetrics(
            log, train.unreplicate, start_step=start_step,
            total_steps=data.total_steps,
            steps_per_epoch=data.steps_per_epoch,
            batch_size=config.optim.batch_size, check=c.check_finite,
            desc=(f'Group {group_index + 1}/{num_groups} ({len(members)} '
                  'stacked)') if i == 0 else None)))
        for i, (log, c) in enumerate(zip(logs, checkpointings))]
    p_states = train.replicate(tuple(states))
    p_step = jax.pmap(functools.partial(
        stacked_train_step,
        learning_rate_fns=tuple(m.schedule for m in members)),
        axis_name=train.AXIS, donate_argnums=(0,))
    for checkpointing in checkpointings:
      checkpointing.catch_sigterm(preemption)
    evaluator = members[0].evaluator
    in_flight = train.OneStepInFlight()
    for step in range(start_step + 1, data.total_steps + 1):
      p_states, metrics = p_step(p_states, p_frozen, next(batches))
      in_flight.dispatched(metrics)
      for sm, m in zip(step_metrics, metrics):
        sm.add(step, m)
      if step % config.train.log_every_steps == 0:
        for sm in step_metrics:
          sm.write()
      if evaluator.is_time(step):
        for sm, member, p_state in zip(step_metrics, members, p_states):
          sm.write()
          member.evaluator(step, p_state.params)
      # Members save together (a SIGTERM seen by any saves them all).
      if any([c.is_time(step) for c in checkpointings]):
        for sm, log, c, member, p_state in zip(step_metrics, logs,
                                               checkpointings, members,
                                               p_states):
          sm.write()
          log.flush()
          c.save(step, p_state, member.evaluator.history())
      if any(c.preempted for c in checkpointings):
        logging.warning('SIGTERM: saved every member at step %d; exiting. '
                        'Run again with the same workdir to resume.', step)
        return False
  for member, state in zip(members, train.unreplicate(p_states)):
    member.state = state
  return True


def evaluate_members(members, p_frozen, data, config):
  """Scores every member's deferred points: one backbone pass per split."""
  points = [(m, p) for m in members for p in m.evaluator.deferred_parameters()]
  if not points:
    return
  logging.info('Deferred evaluation of %d parameter sets of %d combinations.',
               len(points), len(members))
  accuracies = {}
  for split, source in data.evaluation.items():
    accuracies[split] = deferred_eval.evaluate_each(
        [(m.state.method, p) for m, p in points], p_frozen, source,
        config.eval_batch_size,
        normalization=config.data.normalization).accuracies
  start = 0
  for member in members:
    count = len(member.evaluator.deferred)
    member.evaluator.record_deferred(
        {split: a[start:start + count] for split, a in accuracies.items()})
    start += count


def train_members(config, workdir, grid, evaluation_splits=None,
                  max_stack=MAX_STACK):
  """Trains every combination of `grid` in `workdir`; name -> results, or None.

  `evaluation_splits`: the data splits scored (default: test, and val if
  configured), e.g. ('val',) while choosing on a validation split.
  `max_stack`: members per compiled step (see MAX_STACK).
  """
  config = train.validated(config, workdir)
  check_grid(config, grid)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.locked(workdir, jax.process_index()):
    return _train_members(config, workdir, grid, evaluation_splits, max_stack)


def _train_members(config, workdir, grid, evaluation_splits, max_stack):
  """`train_members` in a workdir this process holds."""
  train.prepare_run(config, workdir)
  workdir_lib.check_identity(workdir, config, sweep_grid=json.dumps(grid))
  memory = host_memory.Phases()
  data = train.Data.load(config)
  memory.mark('loading the data')
  if evaluation_splits is not None:
    data = dataclasses.replace(data, evaluation={
        k: v for k, v in data.evaluation.items() if k in evaluation_splits})
  method, frozen = methods.create_method(config)
  nonfinite.check_backbone(frozen['backbone'], config.backbone.source)
  memory.mark('loading the backbone')
  members = [create_member(name, c, workdir, method.vit, frozen, data)
             for name, (_, c) in member_configs(config, grid).items()]
  groups = {}
  for member in members:
    groups.setdefault(group_key(member.config, grid), []).append(member)
  groups = [stack for group in groups.values()
            for stack in stacks(group, max_stack)]
  logging.info('Sweep: %d combinations in %d stacked groups (%s).',
               len(members), len(groups), [len(g) for g in groups])
  p_frozen = train.replicate(frozen)
  cache = (None if config.train.feature_cache == 'none' else
           train.open_feature_cache(config, workdir, method, frozen, p_frozen,
                                    data))
  memory.mark('putting the states on the devices'
              + ('' if cache is None else ' and building the feature cache'))
  preemption = train.Preemption()
  try:
    with contextlib.ExitStack() as stack:
      for i, group in enumerate(groups):
        if not train_group(group, stack, workdir=workdir, frozen=frozen,
                           p_frozen=p_frozen, data=data, cache=cache,
                           preemption=preemption, group_index=i,
                           num_groups=len(groups)):
          return None
        memory.mark(f'training group {i + 1} of {len(groups)}')
      evaluate_members(members, p_frozen, data, config)
      memory.mark('evaluating')
  finally:
    preemption.restore()
  train.write_json(os.path.join(workdir, host_memory.FILE), memory.records)
  results = {}
  for member in members:
    evaluations = member.evaluator.evaluations
    if 'test_accuracy' in evaluations[-1]:
      results[member.name] = train.finish_run(
          member.config, member.workdir, evaluations, member.state.params,
          data.total_steps)
    else:
      results[member.name] = selection_summary(member.config, evaluations)
      train.write_json(os.path.join(member.workdir, 'results.json'),
                       results[member.name])
  return results


def selection_summary(config, evaluations):
  """results.json of a member trained to be chosen on a validation split."""
  final = evaluations[-1]
  return {'task': config.data.task, 'method': config.method,
          'val_accuracy': final['val_accuracy'], 'epoch': final['epoch'],
          'protocol': (f'selection run: trained on {config.data.train_split}, '
                       f'scored on {config.data.val_split}; no test score'),
          'evaluations': evaluations}


# --- The protocols. ---

def run(config, workdir, grid=None, select_on='test', max_stack=MAX_STACK):
  """The sweep and its protocol; returns workdir/results.json's content, or None."""
  grid = grid or config_grid(config) or REFERENCE_GRID
  # Paths under {workdir} are the sweep's, shared by every phase and member.
  config = train.resolve_workdir_paths(config, workdir)
  if select_on not in SELECT_ON:
    raise SweepError(f'--select_on={select_on!r}; expected one of {SELECT_ON}.')
  if select_on == 'test':
    results = train_members(config, workdir, grid, max_stack=max_stack)
    if results is None:
      return None
    rows = summary_rows(config, grid, results, 'test_accuracy')
    chosen = max(rows, key=lambda r: r['best_test_accuracy'])
    summary = {
        'protocol': 'chosen on test (the reference\'s habit: the best of the '
                    'test evaluations over every combination and epoch; '
                    'optimistic, not a held-out choice)',
        'test_accuracy': chosen['best_test_accuracy'],
        'chosen': chosen['name'], 'combinations': rows}
  else:
    summary = held_out(config, workdir, grid, select_on, max_stack)
    if summary is None:
      return None
  write_summary(workdir, grid, summary)
  return summary


def held_out(config, workdir, grid, val_split, max_stack=MAX_STACK):
  """Trains on the split without `val_split`, chooses on it, retrains on both."""
  train_split, final_split = HELD_OUT[val_split]
  if config.data.source == 'folder':  # Folders hold the parts, not the union.
    final_split = f'{train_split}+{val_split}'
  selection = config.copy_and_resolve_references()
  selection.data.train_split, selection.data.val_split = train_split, val_split
  results = train_members(selection, os.path.join(workdir, 'selection'), grid,
                          evaluation_splits=('val',), max_stack=max_stack)
  if results is None:
    return None
  rows = summary_rows(config, grid, results, 'val_accuracy')
  chosen = max(rows, key=lambda r: r['val_accuracy'])
  final = member_configs(config, grid)[chosen['name']][1]
  final.data.train_split, final.data.val_split = final_split, None
  logging.info('Chosen on %s: %s (%.4f); retraining on %s.', val_split,
               chosen['name'], chosen['val_accuracy'], final_split)
  final_dir = os.path.join(workdir, 'final')
  results = train.train_and_evaluate(final, final_dir)
  if results is None:
    return None
  protocol = (f'held out: each combination trained on {train_split} and '
              f'scored on {val_split}; the chosen one (best final-epoch '
              f'{val_split} accuracy) retrained on {final_split}; test '
              'scored once')
  results['protocol'] = protocol
  train.write_json(os.path.join(final_dir, 'results.json'), results)
  return {'protocol': protocol, 'test_accuracy': results['test_accuracy'],
          'chosen': chosen['name'], 'combinations': rows}


def summary_rows(config, grid, results, key):
  """A row per combination: its fields, final `key` score (and best test)."""
  rows = []
  for name, (fields, _) in member_configs(config, grid).items():
    r = {'name': name, 'fields': fields, key: results[name][key]}
    if key == 'test_accuracy':
      r['best_test_accuracy'] = max(e['test_accuracy']
                                    for e in results[name]['evaluations'])
    rows.append(r)
  return rows


def write_summary(workdir, grid, summary):
  """results.json, summary.txt (a table) and accuracy.png of the sweep."""
  train.write_json(os.path.join(workdir, 'results.json'), summary)
  if jax.process_index() != 0:
    return
  key = 'val_accuracy' if 'val_accuracy' in summary['combinations'][0] else (
      'test_accuracy')
  lines = [' '.join(f'{f:>18}' for f in (*grid, key)) + '  chosen']
  for r in summary['combinations']:
    lines.append(' '.join(f'{r["fields"][f]!s:>18}' for f in grid) +
                 f' {r[key]:18.4f}' + ('  *' if r['name'] == summary['chosen']
                                       else ''))
  lines.append(f'{summary["protocol"]}: test accuracy '
               f'{summary["test_accuracy"]:.4f} ({summary["chosen"]}).')
  table = '\n'.join(lines)
  with open(os.path.join(workdir, 'summary.txt'), 'w') as f:
    f.write(table + '\n')
  logging.info('Sweep summary:\n%s', table)
  plot_accuracies(os.path.join(workdir, 'accuracy.png'), summary, key)


def plot_accuracies(path, summary, key):
  """A bar per combination, the chosen one highlighted."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = summary['combinations']
  fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(rows)), 3.5))
  ax.bar(range(len(rows)), [r[key] for r in rows],
         color=['C1' if r['name'] == summary['chosen'] else 'C0' for r in rows])
  ax.set_xticks(range(len(rows)), [r['name'] for r in rows], rotation=90,
                fontsize=6)
  ax.set_ylabel(key.replace('_', ' '))
  ax.set_title('Accuracy per combination (chosen in orange)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
