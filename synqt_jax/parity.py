"""Checks this implementation against numbers saved from the PyTorch reference.

A reference file (`official_synqt_t4.npz` in shared/parity) holds images, labels,
the reference's logits, and every trainable tensor (`param:<name>`) with its
gradient of the mean cross-entropy (`grad:<name>`). Loading the parameters through
`reference.convert` onto the same backbone must reproduce both.

Some gradients are float32 round-off in the reference itself: SynQT's query
self-attention is saturated at initialisation, so the gradients of its q/k
projections are ~1e-9 of the largest and come out of a cancellation; against a
float64 evaluation the reference's values there are 100% off. So each tensor is
compared relative to max(its largest magnitude, the reference's round-off floor),
the floor being the largest absolute error of any reference gradient against the
float64 gradient (measured on the same inputs, not assumed).
"""
import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synqt_jax import checkpoint
from synqt_jax import reference
from synqt_jax import synqt

LOGIT_TOL = 1e-4
GRAD_TOL = 1e-3  # Relative to the largest magnitude of the reference tensor.


@dataclasses.dataclass
class ParityReport:
  logit_diff: float
  loss: float
  reference_loss: float
  # Name -> max |ours - reference| / max(max |reference|, roundoff_floor).
  grad_diffs: Dict[str, float]
  roundoff_floor: float  # Max |reference - float64 gradient| over all tensors.
  below_floor: int  # Tensors whose reference gradient is below the floor.
  n_trainable: int  # Ours: the reference's count minus its unused values.
  reference_n_trainable: int
  unused: int

  def failures(self):
    """Reference names whose gradients are out of tolerance."""
    return sorted(k for k, d in self.grad_diffs.items() if d > GRAD_TOL)

  @property
  def ok(self):
    return self.logit_diff <= LOGIT_TOL and not self.failures()


def load_reference(path):
  """`(arrays, params, grads)` of a reference file, with a clear error if it is not one."""
  flat = checkpoint.load_npz(path)
  need = ('images', 'labels', 'logits')
  if any(k not in flat for k in need) or not any(k.startswith('param:') for k in flat):
    raise checkpoint.CheckpointError(
        f'{path!r} is not a reference parity file: it needs {need} and '
        f'param:<name> / grad:<name> arrays (see shared/parity/README.md).')
  params = {k[len('param:'):]: v for k, v in flat.items() if k.startswith('param:')}
  grads = {k[len('grad:'):]: v for k, v in flat.items() if k.startswith('grad:')}
  return flat, params, grads


def loss_and_grads(vit, config, trainable, backbone, images, labels, dtype):
  """Mean cross-entropy, logits and the gradient w.r.t. `trainable`, all in `dtype`."""
  model = synqt.SynQTModel(dataclasses.replace(vit, dtype=dtype), config)
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)

  def loss_fn(trainable, backbone, images, labels):
    logits = model.apply({'params': {**trainable, 'backbone': backbone}}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      cast(trainable), cast(backbone), cast(images), labels)
  return float(loss), np.asarray(logits), {
      k: np.asarray(v, np.float64) for k, v in checkpoint.flatten(grads).items()}


def check(backbone_path, reference_path) -> ParityReport:
  """Logits and gradients of our model vs the reference file's, on its images."""
  arrays, params, grads = load_reference(reference_path)
  images, labels = arrays['images'], jnp.asarray(arrays['labels'], jnp.int32)
  vit, backbone = checkpoint.load(backbone_path, image_size=images.shape[1],
                                  headless=True)
  config = reference.synqt_config(params)
  trainable = reference.convert(params)
  check_tree(synqt.SynQTModel(vit, config), trainable, images)
  args = (vit, config, trainable, backbone, images, labels)
  loss, logits, ours = loss_and_grads(*args, jnp.float32)
  with jax.enable_x64(True):
    _, _, exact = loss_and_grads(*args, jnp.float64)

  pairs = {}  # Name -> (ours, reference, exact), in the reference's layout.
  for name, ref in grads.items():
    if reference.is_unused(name):
      continue
    ref = np.asarray(ref, np.float64)
    key = '/'.join(reference.tree_path(name, ref.ndim))
    layout = (lambda g: g.T) if key.endswith('kernel') else (lambda g: g)
    pairs[name] = (layout(ours[key]), ref, layout(exact[key]))
  floor = max(np.max(np.abs(ref - true)) for _, ref, true in pairs.values())
  scale = {name: max(np.max(np.abs(ref)), floor) for name, (_, ref, _) in pairs.items()}
  return ParityReport(
      logit_diff=float(np.max(np.abs(logits - arrays['logits']))),
      loss=loss, reference_loss=float(arrays.get('loss', np.nan)),
      grad_diffs={name: float(np.max(np.abs(mine - ref)) / scale[name])
                  for name, (mine, ref, _) in pairs.items()},
      roundoff_floor=float(floor),
      below_floor=sum(np.max(np.abs(ref)) < floor for _, ref, _ in pairs.values()),
      n_trainable=checkpoint.count_params(trainable),
      reference_n_trainable=int(arrays.get('n_trainable', -1)),
      unused=reference.unused_count(params))


def check_tree(model, trainable, images):
  """Raises if the converted parameters do not fit the model key for key."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])['params']
  shapes.pop('backbone')
  want = {k: v.shape for k, v in checkpoint.flatten(shapes).items()}
  have = {k: v.shape for k, v in checkpoint.flatten(trainable).items()}
  if want != have:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f'{k}: expected {want[k]}, found {have[k]}'
             for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    raise checkpoint.CheckpointError(
        'Reference parameters do not fit the model. '
        f'Missing: {missing}. Unexpected: {extra}. Shapes: {wrong}.')
