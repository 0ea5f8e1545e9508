"""Checks this implementation against numbers saved from the PyTorch reference.

A reference file (docs/parity.md) holds images, labels, the reference's logits and
the gradients of its mean cross-entropy (`grad:<name>`) for its trainable tensors,
whose values are either stored (`param:<name>`) or drawn from a seed
(`param_init`, see `random_vit.reference_parameters`); a file that names its
backbone (`backbone`: `random_vit.make` arguments) needs no backbone file.

Both sides are judged against a float64 evaluation of this model on the same
inputs and parameters: float32 round-off is what each side's distance to it
measures, and some of it is large (SynQT's query self-attention is saturated at
initialisation, so the gradients of its q/k projections come out of a
cancellation and are ~100% off float64 in the reference and here alike). A
quantity passes when this project's distance and the reference's are both within
the tolerance, or within a factor `ROUNDOFF_RATIO` of each other: ours may be at
most twice as far from float64 as the reference is (round-off no worse than the
reference's), and the reference at most twice as far as ours (else the two
models differ). Gradient distances are max |x - float64| relative to
max(max |float64|, round-off floor), the floor being our own largest absolute
float32 error over all tensors, so that tensors ~1e-9 of the largest are not
judged on their own scale.
"""
import dataclasses
import functools
import json
import os
import tempfile
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synqt_jax import errors
from synqt_jax.models import synqt
from synqt_jax.testing import random_vit
from synqt_jax.testing import reference
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts

LOGIT_TOL = 1e-4  # Absolute, on the logits.
GRAD_TOL = 1e-3  # Relative, as described above.
ROUNDOFF_RATIO = 2.0


def agree(ours, theirs, tol):
  """Both distances to float64 within `tol`, or within ROUNDOFF_RATIO of each other."""
  return max(ours, theirs) <= max(ROUNDOFF_RATIO * min(ours, theirs), tol)


@dataclasses.dataclass
class ParityReport:
  logit_diff: float  # max |ours - reference|.
  logit_errors: Tuple[float, float]  # (ours, reference) max |logits - float64|.
  loss: float
  reference_loss: float
  # Name -> max |ours - reference| gradient, relative as the distances below.
  grad_diffs: Dict[str, float]
  # Name -> (ours, reference) distance to the float64 gradient, relative.
  grad_errors: Dict[str, Tuple[float, float]]
  roundoff_floor: float  # Max |ours - float64| over all gradients.
  n_trainable: int  # Ours: the reference's count minus its unused values.
  reference_n_trainable: int
  unused: int

  def failures(self):
    """Reference names whose gradients do not agree (see the module docstring)."""
    return sorted(k for k, (ours, ref) in self.grad_errors.items()
                  if not agree(ours, ref, GRAD_TOL))

  def worst(self):
    """`(name, (ours, reference))` pairs, the larger distance first."""
    return sorted(self.grad_errors.items(), key=lambda kv: -max(kv[1]))

  @property
  def logits_ok(self):
    return agree(*self.logit_errors, LOGIT_TOL)

  @property
  def ok(self):
    return self.logits_ok and not self.failures()


def load_reference(path):
  """`(arrays, params, grads)` of a reference file, with a clear error if it is not one."""
  flat = checkpoint.load_npz(path)
  need = ('images', 'labels', 'logits')
  params = {k[len('param:'):]: v for k, v in flat.items() if k.startswith('param:')}
  if 'param_init' in flat:
    init = json.loads(str(flat['param_init']))
    params = random_vit.reference_parameters(init['shapes'], init['seed'], init['scales'])
  grads = {k[len('grad:'):]: v for k, v in flat.items() if k.startswith('grad:')}
  if any(k not in flat for k in need) or not params or not grads:
    raise errors.CheckpointError(
        f'{path!r} is not a reference parity file: it needs {need}, grad:<name> '
        f'arrays and param:<name> arrays or param_init (see docs/parity.md).')
  return flat, params, grads


@functools.lru_cache(maxsize=None)
def _loss_and_grads_fn(vit, config, dtype):
  """Jitted (trainable, backbone, images, labels) -> ((loss, logits), grads), reused
  across reference files of the same shapes."""
  model = synqt.SynQTModel(dataclasses.replace(vit, dtype=dtype), config)

  def loss_fn(trainable, backbone, images, labels):
    logits = model.apply({'params': {**trainable, 'backbone': backbone}}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def loss_and_grads(vit, config, trainable, backbone, images, labels, dtype):
  """Mean cross-entropy, logits and the gradient w.r.t. `trainable`, all in `dtype`."""
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  (loss, logits), grads = _loss_and_grads_fn(vit, config, dtype)(
      cast(trainable), cast(backbone), cast(images), labels)
  return float(loss), np.asarray(logits, np.float64), {
      k: np.asarray(v, np.float64) for k, v in layouts.flatten(grads).items()}


def load_backbone(backbone_path, arrays, image_size, reference_path):
  """`checkpoint.load` of the given backbone, or of the one the file names."""
  if backbone_path:
    return checkpoint.load(backbone_path, image_size=image_size, headless=True)
  if 'backbone' not in arrays:
    raise errors.CheckpointError(
        f'{reference_path!r} does not name its backbone: pass the backbone .npz it '
        f'was computed on (for official_synqt_t4.npz: python -m synqt_jax.testing.random_vit '
        f'vit.npz).')
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'backbone.npz')
    random_vit.write(path, **json.loads(str(arrays['backbone'])))
    return checkpoint.load(path, image_size=image_size, headless=True)


def check(backbone_path, reference_path) -> ParityReport:
  """Logits and gradients of our model vs the reference file's, on its images.

  `backbone_path` may be None when the file names its backbone.
  """
  arrays, params, grads = load_reference(reference_path)
  images, labels = arrays['images'], jnp.asarray(arrays['labels'], jnp.int32)
  vit, backbone = load_backbone(backbone_path, arrays, images.shape[1], reference_path)
  config = reference.synqt_config(params)
  trainable = reference.convert(params)
  check_tree(synqt.SynQTModel(vit, config), trainable, images)
  args = (vit, config, trainable, backbone, images, labels)
  loss, logits, ours = loss_and_grads(*args, jnp.float32)
  with jax.enable_x64(True):
    _, exact_logits, exact = loss_and_grads(*args, jnp.float64)

  triples = {}  # Name -> (ours, reference, float64), in the reference's layout.
  for name, ref in grads.items():
    if reference.is_unused(name):
      continue
    ref = np.asarray(ref, np.float64)
    key = '/'.join(reference.tree_path(name, ref.ndim))
    layout = (lambda g: g.T) if key.endswith('kernel') else (lambda g: g)
    triples[name] = (layout(ours[key]), ref, layout(exact[key]))
  distance = lambda x, y: float(np.max(np.abs(x - y)))
  floor = max(distance(mine, true) for mine, _, true in triples.values())
  grad_errors, diffs = {}, {}
  for name, (mine, ref, true) in triples.items():
    scale = max(np.max(np.abs(true)), floor)
    grad_errors[name] = (distance(mine, true) / scale, distance(ref, true) / scale)
    diffs[name] = distance(mine, ref) / scale
  return ParityReport(
      logit_diff=distance(logits, arrays['logits']),
      logit_errors=(distance(logits, exact_logits),
                    distance(arrays['logits'], exact_logits)),
      loss=loss, reference_loss=float(arrays.get('loss', np.nan)),
      grad_diffs=diffs, grad_errors=grad_errors, roundoff_floor=floor,
      n_trainable=checkpoint.count_params(trainable),
      reference_n_trainable=int(arrays.get('n_trainable', -1)),
      unused=reference.unused_count(params))


def check_tree(model, trainable, images):
  """Raises if the converted parameters do not fit the model key for key."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])['params']
  shapes.pop('backbone')
  want = {k: v.shape for k, v in layouts.flatten(shapes).items()}
  have = {k: v.shape for k, v in layouts.flatten(trainable).items()}
  if want != have:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f'{k}: expected {want[k]}, found {have[k]}'
             for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    raise errors.CheckpointError(
        'Reference parameters do not fit the model. '
        f'Missing: {missing}. Unexpected: {extra}. Shapes: {wrong}.')
