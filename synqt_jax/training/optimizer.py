"""The optimizer and learning-rate schedule that `config.optim` describes.

Every `optim` field reaches the optimizer or is refused (`check`): lr, min_lr,
warmup_epochs and epochs make the schedule; b1, b2, eps and weight_decay go
to `optax.<name>` where it takes them, `optim.optax` holds its other keyword
arguments (e.g. name='sgd', optax={'momentum': 0.9}). An optimizer without a
weight_decay argument (sgd, adam, ...) gets the decay added to the gradient
first (`optax.add_decayed_weights`: torch.optim.SGD's weight_decay). A b1, b2
or eps set away from its default for an optimizer that has no such argument
is refused rather than dropped.
"""
import inspect

import optax

from synqt_jax import errors
from synqt_jax.config import fields as config_fields

# optim fields that are keyword arguments of the optax optimizers taking them.
OPTAX_FIELDS = ('b1', 'b2', 'eps', 'weight_decay')


class OptimizerError(errors.UserError, ValueError):
  """An optim field the named optimizer cannot take; the message says which."""


def _name(optim) -> str:
  """The optimizer's name (an export written without one: the default)."""
  return optim.get('name', config_fields.OPTIM_DEFAULTS['name'])


def optax_parameters(name):
  """The parameters of optax.<name> besides the learning rate, or None if
  that is not an optimizer (a function of a learning rate)."""
  function = getattr(optax, name, None) if isinstance(name, str) else None
  try:
    parameters = set(inspect.signature(function).parameters)
  except (TypeError, ValueError):
    return None
  return parameters - {'learning_rate'} if 'learning_rate' in parameters else None


def check(optim) -> None:
  """Raises OptimizerError for a b1/b2/eps optax.<optim.name> has no use for.

  Fields at their defaults (config/fields.py OPTIM_DEFAULTS) are AdamW's and
  pass unused; weight_decay always applies (see the module docstring).
  """
  name = _name(optim)
  parameters = optax_parameters(name)
  for field in OPTAX_FIELDS:
    if (field != 'weight_decay' and field not in parameters
        and optim[field] != config_fields.OPTIM_DEFAULTS[field]):
      raise OptimizerError(
          f'config.optim.{field}={optim[field]!r}: optax.{name} takes no '
          f'{field}; leave it at {config_fields.OPTIM_DEFAULTS[field]!r}, or '
          f"choose an optimizer that does (e.g. optim.name='adamw').")


def arguments(optim):
  """(name, kwargs, decay): optax.<name>(learning_rate, **kwargs), and the
  weight decay added to the gradient before it (0 when it takes its own)."""
  name = _name(optim)
  parameters = optax_parameters(name)
  kwargs = {k: optim[k] for k in OPTAX_FIELDS if k in parameters}
  kwargs.update(optim.get('optax', {}))
  decay = 0.0 if 'weight_decay' in parameters else optim.weight_decay
  return name, kwargs, decay


def describe(optim) -> str:
  """'optax.adamw(b1=0.9, ...)', as the run log shows it."""
  name, kwargs, decay = arguments(optim)
  text = f'optax.{name}({", ".join(f"{k}={v!r}" for k, v in kwargs.items())})'
  return (f'optax.chain(optax.add_decayed_weights({decay!r}), {text})'
          if decay else text)


def create(optim, learning_rate_fn):
  """optax.<optim.name>(learning_rate_fn, ...); AdamW is PyTorch's AdamW
  (decoupled weight decay on every trainable tensor)."""
  name, kwargs, decay = arguments(optim)
  tx = getattr(optax, name)(learning_rate_fn, **kwargs)
  return optax.chain(optax.add_decayed_weights(decay), tx) if decay else tx


def learning_rate_schedule(optim, steps_per_epoch):
  """The reference's per-step learning rate, indexed by optimizer step.

  lr(t), t = step / steps_per_epoch in epochs: lr * t / warmup for t < warmup,
  then min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup) / (epochs -
  warmup))) / 2. Step 0 has learning rate 0.
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr,
      warmup_steps=optim.warmup_epochs * steps_per_epoch,
      decay_steps=optim.epochs * steps_per_epoch, end_value=optim.min_lr)
