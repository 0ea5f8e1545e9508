"""Checks a training config before any compute, naming the field that is wrong.

The fields and their defaults are in configs/common.py.
"""
import numbers

from synqt_jax import checkpoint
from synqt_jax import input_pipeline
from synqt_jax import methods

DTYPES = ('float32', 'bfloat16')
FEATURE_CACHES = ('none', 'device', 'host', 'disk')
CACHE_DTYPES = ('float32', 'bfloat16')
IMAGE_PATH_MEMORY = ('keep_kv', 'recompute')


class ConfigError(ValueError):
  """A config field with a bad value; the message names the field."""


def _get(config, name):
  value = config
  for part in name.split('.'):
    if part not in value:
      raise ConfigError(f'config.{name} is missing; see configs/common.py.')
    value = value[part]
  return value


def _check(config, name, ok, expected):
  value = _get(config, name)
  if not ok(value):
    raise ConfigError(f'config.{name}={value!r}; expected {expected}.')


def _is_int(x):
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x):
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(x):
  return _is_int(x) and x > 0


def _fraction(x):
  """A probability of dropping: 0 <= x < 1."""
  return _is_real(x) and 0 <= x < 1


def validate(config) -> None:
  """Raises ConfigError (or DataConfigError for `data.*`) on the first bad field."""
  _check(config, 'method', lambda x: x in methods.METHODS,
         f'one of {methods.METHODS}')
  _check(config, 'checkpoint.source', lambda x: isinstance(x, str) and x,
         'a checkpoint path, URL or name such as "ViT-B_16"')
  _check(config, 'checkpoint.collection', lambda x: isinstance(x, str),
         'a collection name such as "imagenet21k"')
  _check(config, 'checkpoint.cache_dir',
         lambda x: x is None or isinstance(x, str) and x,
         'a directory, or None for the default cache')
  _check(config, 'checkpoint.posemb_resize',
         lambda x: x is None or x in checkpoint.POSEMB_RESIZE,
         f'None (the file\'s choice) or one of {checkpoint.POSEMB_RESIZE}')
  input_pipeline.validate_data_config(_get(config, 'data'))

  _check(config, 'synqt.token_nums', _positive_int, 'a positive int (1, 4, 16)')
  for scale in ('attn_scale', 'ffn_scale', 'feat_scale'):
    _check(config, f'synqt.{scale}', _is_real, 'a number')
  for rate in ('dropout', 'drop_path', 'head_drop_path'):
    _check(config, f'synqt.{rate}', _fraction, 'a rate in [0, 1)')
  _check(config, 'synqt.image_path_memory', lambda x: x in IMAGE_PATH_MEMORY,
         f'one of {IMAGE_PATH_MEMORY}')

  optim = _get(config, 'optim')
  _check(config, 'optim.lr', lambda x: _is_real(x) and x > 0, 'a number > 0')
  _check(config, 'optim.min_lr', lambda x: _is_real(x) and 0 <= x <= optim.lr,
         f'a number in [0, optim.lr={optim.lr}]')
  _check(config, 'optim.weight_decay', lambda x: _is_real(x) and x >= 0,
         'a number >= 0')
  for beta in ('b1', 'b2'):
    _check(config, f'optim.{beta}', _fraction, 'a number in [0, 1)')
  _check(config, 'optim.eps', lambda x: _is_real(x) and x > 0, 'a number > 0')
  _check(config, 'optim.batch_size', _positive_int, 'a positive int')
  _check(config, 'optim.epochs', _positive_int, 'a positive int')
  _check(config, 'optim.warmup_epochs',
         lambda x: _is_int(x) and 0 <= x <= optim.epochs,
         f'an int in [0, optim.epochs={optim.epochs}]')

  _check(config, 'train.feature_cache', lambda x: x in FEATURE_CACHES,
         f'one of {FEATURE_CACHES}')
  _check(config, 'train.cache_dtype', lambda x: x in CACHE_DTYPES,
         f'one of {CACHE_DTYPES}')
  _check(config, 'train.deferred_eval', lambda x: isinstance(x, bool),
         'True or False')
  # Both read the image path's K/V apart from the query path: SynQT only.
  method = _get(config, 'method')
  _check(config, 'train.feature_cache',
         lambda x: x == 'none' or method == 'synqt',
         f"'none' with method={method!r} (a feature cache serves 'synqt' only)")
  _check(config, 'train.deferred_eval',
         lambda x: not x or method == 'synqt',
         f"False with method={method!r} (deferred evaluation serves 'synqt' "
         'only)')
  for name in ('train.log_every_steps', 'eval_every_epochs', 'eval_batch_size',
               'checkpoint_every_steps', 'keep_checkpoints'):
    _check(config, name, _positive_int, 'a positive int')
  _check(config, 'seed', lambda x: _is_int(x) and x >= 0, 'an int >= 0')
  _check(config, 'dtype', lambda x: x in DTYPES, f'one of {DTYPES}')
  _check(config, 'tensorboard', lambda x: isinstance(x, bool), 'True or False')


def validate_device_split(config, device_count: int) -> None:
  """Batches must split evenly over all devices (of all hosts)."""
  for name in ('optim.batch_size', 'eval_batch_size'):
    _check(config, name, lambda x: x % device_count == 0,
           f'a multiple of the {device_count} devices')
