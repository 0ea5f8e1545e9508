"""Checks a training config before any compute, naming the field that is wrong.

The fields and their defaults are in configs/common.py; each method's own
section is checked by the fields it declares in methods.REGISTRY.
"""
import functools

from synqt_jax import errors
from synqt_jax.config import fields as config_fields
from synqt_jax.data import augment
from synqt_jax.data import data_config
from synqt_jax.models import methods
from synqt_jax.models import vit as models_vit
from synqt_jax.training import feature_cache
from synqt_jax.training import optimizer
from synqt_jax.weights import position_embedding

FEATURE_CACHES = ('none',) + feature_cache.MODES


class ConfigError(errors.UserError, ValueError):
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
    shown = value.to_dict() if hasattr(value, 'to_dict') else value  # One line.
    raise ConfigError(f'config.{name}={shown!r}{config_fields.alias_note(name)}'
                      f'; expected {expected}.')


def _check_fields(config, section, fields):
  for field in fields:
    _check(config, f'{section}.{field.name}', field.ok, field.expected)


def validate(config) -> None:
  """Raises ConfigError (or DataConfigError for `data.*`) on the first bad field."""
  _check(config, 'method', lambda x: x in methods.METHODS,
         f'one of {methods.METHODS}')
  method = _get(config, 'method')
  registered = methods.REGISTRY[method]
  _check(config, 'backbone.source', lambda x: isinstance(x, str) and x,
         'a checkpoint path, URL or name such as "ViT-B_16"')
  _check(config, 'backbone.collection', lambda x: isinstance(x, str),
         'a collection name such as "imagenet21k"')
  _check(config, 'backbone.cache_dir',
         lambda x: x is None or isinstance(x, str) and x,
         'a directory, or None for the default cache')
  _check(config, 'backbone.posemb_resize',
         lambda x: x is None or x in position_embedding.POSEMB_RESIZE,
         f'None (the file\'s choice) or one of {position_embedding.POSEMB_RESIZE}')
  data_config.validate_data_config(_get(config, 'data'))
  # The method's own section, checked by the fields it declares.
  if registered.fields:
    _check_fields(config, method, registered.fields)

  optim = _get(config, 'optim')
  _check(config, 'optim.name',
         lambda x: optimizer.optax_parameters(x) is not None,
         "the name of an optax optimizer, such as 'adamw', 'adam', 'sgd' or "
         "'lamb'")
  parameters = optimizer.optax_parameters(optim.name)
  _check(config, 'optim.optax',
         lambda x: hasattr(x, 'keys') and set(x.keys()) <= parameters,
         f'a dict of keyword arguments of optax.{optim.name} '
         f'({", ".join(sorted(parameters))})')
  is_real, is_int = config_fields.is_real, config_fields.is_int
  positive_int = config_fields.positive_int
  _check(config, 'optim.lr', lambda x: is_real(x) and x > 0, 'a number > 0')
  _check(config, 'optim.min_lr', lambda x: is_real(x) and 0 <= x <= optim.lr,
         f'a number in [0, optim.lr={optim.lr}]')
  _check(config, 'optim.weight_decay', lambda x: is_real(x) and x >= 0,
         'a number >= 0')
  for beta in ('b1', 'b2'):
    _check(config, f'optim.{beta}', config_fields.fraction,
           'a number in [0, 1)')
  _check(config, 'optim.eps', lambda x: is_real(x) and x > 0, 'a number > 0')
  _check(config, 'optim.batch_size', positive_int, 'a positive int')
  _check(config, 'optim.epochs', positive_int, 'a positive int')
  # The cosine needs at least one epoch after the warm-up to decay over.
  _check(config, 'optim.warmup_epochs',
         lambda x: is_int(x) and 0 <= x < optim.epochs,
         f'an int in [0, optim.epochs={optim.epochs})')
  optimizer.check(optim)

  _check(config, 'train.feature_cache', lambda x: x in FEATURE_CACHES,
         f'one of {FEATURE_CACHES}')
  _check(config, 'train.cache_dtype',
         lambda x: x in models_vit.DTYPES,
         f'one of {tuple(models_vit.DTYPES)}')
  _check(config, 'train.deferred_eval', lambda x: isinstance(x, bool),
         'True or False')
  _check(config, 'train.feature_cache',
         lambda x: x == 'none' or registered.reads_cached_kv,
         f"'none' with method={method!r} (a feature cache serves "
         f'{methods.CACHE_METHODS} only)')
  # A cache holds one fixed view per image; augmentation draws new ones.
  _check(config, 'train.feature_cache',
         lambda x: x == 'none' or augment.augmentation(config.data) == 'none',
         f"'none' with data.augmentation={augment.augmentation(config.data)!r} "
         '(the cache holds one fixed view of each image; augmentation draws a '
         "new crop every step), or set data.augmentation='none'")
  if registered.check is not None:  # The method's own cross-field checks.
    registered.check(config, functools.partial(_check, config))
  _check(config, 'train.deferred_eval',
         lambda x: not x or registered.reads_cached_kv,
         f'False with method={method!r} (deferred evaluation serves '
         f'{methods.CACHE_METHODS} only)')
  for name in ('train.log_every_steps', 'eval_every_epochs', 'eval_batch_size',
               'checkpoint_every_steps', 'keep_checkpoints'):
    _check(config, name, positive_int, 'a positive int')
  _check(config, 'seed', lambda x: is_int(x) and x >= 0, 'an int >= 0')
  _check(config, 'dtype', lambda x: x in models_vit.DTYPES,
         f'one of {tuple(models_vit.DTYPES)}')
  _check(config, 'backbone_dtype', lambda x: x in models_vit.DTYPES,
         f'one of {tuple(models_vit.DTYPES)}')
  _check(config, 'backbone_dtype',
         lambda x: x == 'float32' or not registered.trains_backbone,
         f"'float32' with method={method!r} (it trains the backbone: its "
         "weights are the trainable state, kept in float32)")
  _check(config, 'tensorboard', lambda x: isinstance(x, bool), 'True or False')
  _check(config, 'prepare',
         lambda x: x is None or config_fields.function(x) is not None,
         "None, or 'module.function' (importable), e.g. "
         "'synqt_jax.demo.prepare'")


def validate_device_split(config, device_count: int) -> None:
  """Batches must split evenly over all devices (of all hosts)."""
  for name in ('optim.batch_size', 'eval_batch_size'):
    _check(config, name, lambda x: x % device_count == 0,
           f'a multiple of the {device_count} devices')
