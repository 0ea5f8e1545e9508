"""Config fields that several modules define or check, importable without JAX or TFDS.

configs/common.py builds its config from these, config_validation.py checks
with them, and each tuning method declares its own section (`config.<method>`)
as a tuple of `Field`s (methods.py), so that a field's default and what it
accepts are written once.
"""
import dataclasses
import importlib
import numbers
from typing import Any, Callable

import ml_collections

# The data config (`config.data`, data_config.py): the reference's defaults.
DATA_DEFAULTS = dict(source='tfds', task='cifar100', root=None, num_classes=None,
                     image_size=224,
                     normalization='imagenet', train_split='train800val200',
                     test_split='test', val_split='val200',
                     augmentation='none')

# The optimizer (`config.optim`, training/optimizer.py): the reference's
# recipe, optax.adamw (PyTorch's AdamW); the learning rate per step is a linear
# warm-up from 0, then a half-cycle cosine to min_lr.
OPTIM_DEFAULTS = dict(name='adamw', optax={}, lr=1e-3, weight_decay=1e-2,
                      b1=0.9, b2=0.999, eps=1e-8, batch_size=64, epochs=50,
                      warmup_epochs=10, min_lr=1e-6)

# Deprecated name -> the field it names: `config.checkpoint` (older configs'
# and exports' name of the pre-trained backbone; `checkpoints/` are the run's
# own) reads and writes `config.backbone`.
ALIASES = {'checkpoint': 'backbone'}


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a config section: its default and the values it accepts."""
  name: str
  default: Any
  ok: Callable[[Any], bool]
  expected: str  # What `ok` accepts, in words, for the error message.


def is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def positive_int(x) -> bool:
  return is_int(x) and x > 0


def fraction(x) -> bool:
  """A probability of dropping: 0 <= x < 1."""
  return is_real(x) and 0 <= x < 1


def section(fields) -> ml_collections.ConfigDict:
  """A config section holding each field's default."""
  return ml_collections.ConfigDict({f.name: f.default for f in fields})


def add_aliases(config) -> None:
  """Makes each deprecated name (ALIASES) an alias of its field, read and write."""
  for old, new in ALIASES.items():
    config[old] = config.get_ref(new)


def from_dict(fields: dict) -> ml_collections.ConfigDict:
  """A config from a dict that may use deprecated names (an older export's)."""
  fields = dict(fields)
  for old, new in ALIASES.items():
    if old in fields:
      fields.setdefault(new, fields.pop(old))
  config = ml_collections.ConfigDict(fields)
  add_aliases(config)
  return config


def without_aliases(fields: dict) -> dict:
  """`config.to_dict()` less the aliases' copies of their fields."""
  return {k: v for k, v in fields.items() if k not in ALIASES}


def deprecation(override: str) -> str | None:
  """One line for a `--config.<override>` that uses a deprecated name, or None."""
  old, _, rest = override.partition('.')
  if old not in ALIASES:
    return None
  new = '.'.join(filter(None, (ALIASES[old], rest)))
  return (f'--config.{override} is deprecated: it sets config.{new}; write '
          f'--config.{new} instead.')


def alias_note(name: str) -> str:
  """' (also written config.<alias>...)' for a field with a deprecated name."""
  new, _, rest = name.partition('.')
  old = [o for o, n in ALIASES.items() if n == new]
  return (f' (also written config.{".".join(filter(None, (old[0], rest)))})'
          if old else '')


def function(name):
  """The function a 'module.function' string names, or None if there is none."""
  if not isinstance(name, str) or '.' not in name:
    return None
  module, _, attribute = name.rpartition('.')
  try:
    found = getattr(importlib.import_module(module), attribute, None)
  except (ImportError, ValueError):
    return None
  return found if callable(found) else None
