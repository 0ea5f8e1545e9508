"""What the benchmarks share: each method's training step, built as the trainer builds it.

The step is `steps.train_step` under `jax.pmap` on one device, with the trainer's
AdamW, so a figure here is a figure of a real run. `abstract=True` builds it from
shapes alone (`jax.ShapeDtypeStruct`), enough for XLA's memory and cost analyses
of ViT-B/16 without allocating its weights.
"""
import argparse
import dataclasses
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common as common_config
from synqt_jax.models import methods
from synqt_jax.models import vit as models_vit
from synqt_jax.training import devices
from synqt_jax.training import host_memory
from synqt_jax.training import optimizer
from synqt_jax.training import state as state_lib
from synqt_jax.training import steps
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts

# ViT-B/16 at 224, headless, as SynQT uses the ImageNet-21k checkpoint.
VIT_B16 = models_vit.ViTConfig(hidden_size=768, num_layers=12, num_heads=12,
                               mlp_dim=3072, patch_size=16, image_size=224)
NUM_CLASSES = 100
STEPS_PER_EPOCH = 16  # 1000 VTAB-1k training images in batches of 64.


def parse_ints(text):
  return [int(x) for x in text.split(',') if x]


def recipe_parser(doc):
  """A benchmark's parser with the VTAB-1k recipe it projects onto (cache, sweep)."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--train-images', type=int, default=1000)
  parser.add_argument('--epochs', type=int, default=50)
  parser.add_argument('--evaluations', type=int, default=5)
  parser.add_argument('--test-images', type=int, default=10_000)
  return parser


def learning_rate_schedule():
  """The VTAB-1k recipe's schedule (its values do not change memory or speed)."""
  return optimizer.learning_rate_schedule(common_config.get_config().optim, STEPS_PER_EPOCH)


def random_backbone(vit, seed=0, dtype=jnp.float32):
  """A random headless backbone tree of `vit`'s size, in the checkpoint layout.

  Weights N(0, 0.02^2), drawn a layer at a time into 64-byte aligned arrays:
  held once, as `checkpoint.load` holds a file's, with no second copy on the
  way (making `random_vit.make`'s per-layer arrays and stacking them peaked
  at twice the backbone, a peak the trainer does not have).
  """
  rng = np.random.default_rng(seed)

  def draw(spec):
    out = host_memory.aligned_empty(spec.shape, spec.dtype)
    for part in (out if out.ndim > 2 else [out]):
      part[...] = rng.standard_normal(part.shape, np.float32) * 0.02
    return out

  return jax.tree.map(draw, backbone_shapes(vit, dtype))


def backbone_shapes(vit, dtype=jnp.float32):
  return layouts.nest({k: jax.ShapeDtypeStruct(shape, dtype)
                       for k, shape in checkpoint.expected_shapes(vit).items()})


def initial_state(method, frozen, abstract=True):
  """The trainer's initial `TrainState` of `method` (its shapes if `abstract`)."""
  tx = optimizer.create(common_config.get_config().optim,
                        learning_rate_schedule())

  def create(frozen):
    params = method.init(jax.random.PRNGKey(0), frozen, None)
    return state_lib.TrainState.create(apply_fn=method.apply, params=params,
                                       tx=tx, rng=jax.random.PRNGKey(1),
                                       method=method)

  # Not under a jit, as state_lib.create_train_state: a jit would copy `frozen`.
  return jax.eval_shape(create, frozen) if abstract else create(frozen)


def method_inputs(name, vit, batch_size, num_classes=NUM_CLASSES, abstract=True,
                  config=None):
  """`(state, frozen, batch)` for `steps.train_step`, each with a leading device axis.

  Full fine-tuning holds the backbone once, in its trainable state. The
  method's options and the backbone's dtype come from `config` (default:
  configs/common.py's).
  """
  config = config or common_config.get_config()
  method = methods.create(name, vit, num_classes, config)
  dtype = models_vit.DTYPES[config.backbone_dtype]
  # A CPU device takes the aligned host arrays in place: held once.
  frozen = {'backbone': backbone_shapes(vit, dtype) if abstract else
            jax.device_put(random_backbone(vit, dtype=dtype), jax.local_devices()[0])}
  state = initial_state(method, frozen, abstract)
  frozen = {k: v for k, v in frozen.items() if k not in state.params}  # As train.py.
  s = vit.image_size
  batch = {'image': ((batch_size, s, s, 3), jnp.float32),
           'label': ((batch_size,), jnp.int32), 'mask': ((batch_size,), jnp.float32)}
  if abstract:
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch.items()}
  else:
    rng = np.random.default_rng(0)
    batch = {'image': rng.standard_normal(batch['image'][0], np.float32),
             'label': rng.integers(0, num_classes, batch_size).astype(np.int32),
             'mask': np.ones(batch_size, np.float32)}
  return tuple(with_device_axis(tree, abstract) for tree in (state, frozen, batch))


def with_device_axis(tree, abstract=False):
  """`tree` as one device's pmap input: a leading axis of 1, on that device."""
  return jax.tree.map(lambda x: device_axis(x, abstract), tree)


def device_axis(x, abstract):
  if abstract:
    return jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype)
  return jax.device_put(np.asarray(x)[None], jax.local_devices()[0])


def pmapped_train_step():
  """`steps.train_step` as the trainer runs it, on the first device."""
  return jax.pmap(functools.partial(steps.train_step,
                                    learning_rate_fn=learning_rate_schedule()),
                  axis_name=devices.AXIS, donate_argnums=(0,),
                  devices=jax.local_devices()[:1])


def compiled_step(name, vit, batch_size, abstract=True, config=None):
  """The compiled pmapped train step of method `name` and its inputs."""
  inputs = method_inputs(name, vit, batch_size, abstract=abstract, config=config)
  return compile_step(inputs), inputs


def compile_step(inputs):
  """`pmapped_train_step()` compiled for `inputs` (arrays or their shapes) as
  the trainer compiles it (`steps.compiler_options`)."""
  return pmapped_train_step().lower(*inputs).compile(steps.compiler_options())


def step_seconds(compiled, state, frozen, batches, steps):
  """Seconds of each of `steps` runs of the compiled train step on `batches`.

  One untimed warm-up step on the first batch comes first; each timed step
  runs from fetching its batch to its metrics, threading the (donated) state.
  """
  state, metrics = compiled(state, frozen, next(batches))
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, next(batches))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return times


def image_path_flops(vit):
  """Floating-point operations of the frozen image path for one image.

  Two per multiply-add, matmuls only: the patch embedding, every block but
  the last in full (Q/K/V, attention scores and values, output projection,
  MLP), and the last block's keys and values alone, as `image_path` computes.
  Every SynQT step, and the reference's, runs at least this.
  """
  n, d, m = vit.num_tokens, vit.hidden_size, vit.mlp_dim
  patches = (vit.image_size // vit.patch_size) ** 2 * vit.patch_size ** 2 * 3 * d
  block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
  return 2 * (patches + (vit.num_layers - 1) * block + 2 * n * d * d)


def matmul_gflops(vit, repeats=5):
  """JAX's best float32 matmul throughput here, in GFLOP/s.

  The best of a 4096^2 product and the image path's MLP product on one image
  and on 16 (tokens x width times width x MLP width): the most of this
  machine's matmul speed a step can use, so `image_path_flops` over it bounds
  any step's time from below.
  """
  n, d, m = vit.num_tokens, vit.hidden_size, vit.mlp_dim
  product = jax.jit(jnp.matmul)
  best = 0.0
  for rows, inner, cols in ((4096, 4096, 4096), (n, d, m), (16 * n, d, m)):
    a, b = jnp.ones((rows, inner)), jnp.ones((inner, cols))
    product(a, b).block_until_ready()  # Compiles for this shape.
    for _ in range(repeats):
      start = time.perf_counter()
      product(a, b).block_until_ready()
      best = max(best, 2 * rows * inner * cols / (time.perf_counter() - start) / 1e9)
  return best


def backend_description():
  device = jax.local_devices()[0]
  return {'backend': jax.default_backend(), 'device': device.device_kind,
          'machine': platform.processor() or platform.machine(),
          'jax': jax.__version__}


def write_json(path, data):
  with open(path, 'w') as f:
    json.dump(data, f, indent=2, default=lambda o: dataclasses.asdict(o))
