"""Non-finite numbers: a diverged training step, a backbone with NaN weights.

A run stops at the first non-finite loss or gradient norm, and before any
non-finite parameters are saved: the trainer calls `check_step` on each
step's metrics as it fetches them, and on the parameters before every
checkpoint and before the export, so no checkpoint or export ever holds NaN
or Inf, and the last good checkpoint is kept. `check_backbone` refuses a
pre-trained checkpoint with non-finite weights when it is loaded.
"""
import math

import jax
import numpy as np

from synqt_jax import errors


class DivergedError(errors.UserError, FloatingPointError):
  """Training produced a non-finite loss, gradient or parameter."""


class NonFiniteBackboneError(errors.UserError, ValueError):
  """A pre-trained backbone whose weights are not all finite."""


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the leaves of `tree` holding NaN or Inf (host or device arrays)."""
  return [jax.tree_util.keystr(path)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if not np.isfinite(np.asarray(leaf, np.float32)).all()]


def check_step(step: int, learning_rate: float, last_good_step: int | None,
               checkpoint_dir: str, *, loss=None, grad_norm=None,
               params=None) -> None:
  """Raises DivergedError if the loss, gradient norm or parameters are not finite.

  Args:
    step: the step number as metrics.jsonl shows it (steps done).
    learning_rate: the step's learning rate.
    last_good_step: the newest checkpoint's step (None: none yet).
    checkpoint_dir: where the checkpoints are.
    loss, grad_norm: the step's scalars, if fetched.
    params: the trainable parameters (before a checkpoint or the export).
  """
  bad = [f'{name} {value}' for name, value in
         (('loss', loss), ('gradient norm', grad_norm))
         if value is not None and not math.isfinite(float(value))]
  if params is not None:
    leaves = nonfinite_leaves(params)
    if leaves:
      bad.append(f'non-finite parameters ({", ".join(leaves[:3])}'
                 f'{", ..." if len(leaves) > 3 else ""})')
  if not bad:
    return
  kept = (f'the last good checkpoint, step {last_good_step} in '
          f'{checkpoint_dir}, is kept' if last_good_step is not None
          else 'no checkpoint had been saved yet')
  raise DivergedError(
      f'Training diverged at step {step} (learning rate {learning_rate:.3g}): '
      f'{"; ".join(bad)}. Nothing was saved from it; {kept}. Lower optim.lr '
      '(or check the data and the backbone) and train in a new workdir.')


def check_backbone(backbone, source: str) -> None:
  """Raises NonFiniteBackboneError if any weight of `backbone` is NaN or Inf."""
  leaves = nonfinite_leaves(backbone)
  if leaves:
    raise NonFiniteBackboneError(
        f'The backbone {source} has non-finite weights (in {len(leaves)} '
        f'arrays, e.g. {leaves[0]}): the file is damaged or was saved from a '
        'diverged run. Download it again or use another checkpoint.')
