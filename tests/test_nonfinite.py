"""The NaN/Inf guard: a diverged step stops the run; a NaN backbone is refused (issue 15)."""
import numpy as np
import pytest

from synqt_jax.training import nonfinite


def test_nan_loss_names_the_step_the_learning_rate_and_the_last_checkpoint():
  """Defect 3: --config.optim.lr=1e30 trained on to a NaN export."""
  with pytest.raises(nonfinite.DivergedError) as info:
    nonfinite.check_step(57, 1e30, 50, '/runs/x/checkpoints', loss=float('nan'))
  assert str(info.value) == (
      'Training diverged at step 57 (learning rate 1e+30): loss nan. Nothing '
      'was saved from it; the last good checkpoint, step 50 in '
      '/runs/x/checkpoints, is kept. Lower optim.lr (or check the data and the '
      'backbone) and train in a new workdir.')


def test_infinite_gradient_norm_or_parameters_stop_the_run():
  with pytest.raises(nonfinite.DivergedError, match='gradient norm inf'):
    nonfinite.check_step(3, 1e-3, None, 'c', loss=np.float32(2.3),
                         grad_norm=np.float32('inf'))
  params = {'head': {'kernel': np.array([[1.0, np.inf]], np.float32),
                     'bias': np.zeros(2, np.float32)}}
  with pytest.raises(nonfinite.DivergedError) as info:
    nonfinite.check_step(9, 1e-3, None, 'c', params=params)
  assert "non-finite parameters (['head']['kernel'])" in str(info.value)
  assert 'no checkpoint had been saved yet' in str(info.value)


def test_finite_steps_pass():
  params = {'w': np.ones((2, 2), np.float32)}
  nonfinite.check_step(1, 0.0, None, 'c', loss=2.3, grad_norm=0.5,
                       params=params)
  nonfinite.check_step(1, 0.0, None, 'c')  # Nothing fetched: nothing to check.


def test_backbone_with_nan_weights_is_refused():
  """Defect 3: a backbone full of NaNs trained to a plausible results.json."""
  backbone = {'Transformer': {'encoder_norm': {'scale': np.ones(4, np.float32)}},
              'embedding': {'kernel': np.full((2, 2), np.nan, np.float32)}}
  with pytest.raises(nonfinite.NonFiniteBackboneError) as info:
    nonfinite.check_backbone(backbone, 'ViT-B_16.npz')
  assert "ViT-B_16.npz has non-finite weights (in 1 arrays, e.g. " \
         "['embedding']['kernel'])" in str(info.value)
  backbone['embedding']['kernel'][:] = 0
  nonfinite.check_backbone(backbone, 'ViT-B_16.npz')
