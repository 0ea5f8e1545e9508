"""The Flax ViT against an independent NumPy ViT, its frozen image path, dtypes."""
import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synqt_jax.models import resnet as models_resnet
from synqt_jax.models import vit as models_vit
from synqt_jax.testing import random_vit
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts

# Sizes of checkpoint the forward pass is checked on: (random_vit.make kwargs, head).
SIZES = {
    'w32-d1-h2-p8-prelogits': (dict(width=32, depth=1, heads=2, mlp=64, patch=8,
                                    image=32, pre_logits=True), True),
    'w48-d3-h4-p4-nopre': (dict(width=48, depth=3, heads=4, mlp=96, patch=4,
                                image=16, pre_logits=False, classes=7), True),
    'w32-d2-h4-p16-headless': (dict(width=32, depth=2, heads=4, mlp=48, patch=16,
                                    image=32), False),
}
# Max |bf16 - f32| of the tiny ViT's logits relative to max |f32 logit| (measured
# 0.8%; bfloat16 keeps 8 significant bits, ~0.4% per rounding).
BF16_TOL = 0.03


def images(n, size, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(
      np.float32)


@pytest.mark.parametrize('approximate_gelu', [False, True], ids=['erf', 'tanh'])
@pytest.mark.parametrize('size', list(SIZES))
def test_forward_matches_numpy_vit(tiny_checkpoint, numpy_vit_fn, size,
                                   approximate_gelu):
  kwargs, head = SIZES[size]
  path = tiny_checkpoint(head=head, **kwargs)
  config, params = checkpoint.load(path, approximate_gelu=approximate_gelu)
  assert config.approximate_gelu == approximate_gelu
  x = images(2, kwargs['image'])
  ours = models_vit.VisionTransformer(config).apply({'params': params}, x)
  want = numpy_vit_fn(checkpoint.load_npz(path), x, approximate_gelu=approximate_gelu)
  assert ours.shape == want.shape
  assert np.max(np.abs(np.asarray(ours, np.float64) - want)) <= 1e-4


def test_gelu_option_exact_by_default_and_tanh_on_request():
  """MlpBlock with identity weights is GELU itself: erf by default, tanh if asked."""
  width = 8
  x = np.linspace(-4, 4, 4 * width).reshape(4, width).astype(np.float32)
  eye = {'kernel': np.eye(width, dtype=np.float32), 'bias': np.zeros(width, np.float32)}
  params = {'params': {'Dense_0': eye, 'Dense_1': eye}}
  outs = {}
  for approximate in (False, True):
    config = models_vit.ViTConfig(width, 1, 1, width, 4, 8, approximate_gelu=approximate)
    outs[approximate] = np.asarray(models_vit.MlpBlock(config).apply(params, x), np.float64)
  assert not models_vit.ViTConfig(8, 1, 1, 8, 4, 8).approximate_gelu
  x64 = x.astype(np.float64)
  erf = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
  tanh = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
  np.testing.assert_allclose(outs[False], erf, atol=1e-6)
  np.testing.assert_allclose(outs[True], tanh, atol=1e-6)
  # The two forms really differ (by ~3e-4 near |x| = 2), so the option matters.
  assert np.max(np.abs(outs[False] - outs[True])) > 1e-4


def test_image_path_kv_equals_the_full_forwards_keys_and_values(tiny_checkpoint,
                                                                numpy_vit_fn):
  path = tiny_checkpoint(depth=3)
  config, params = checkpoint.load(path)
  model = models_vit.VisionTransformer(config)
  x = images(2, config.image_size)
  kvs = model.apply({'params': params}, x, method=models_vit.VisionTransformer.image_path)
  assert len(kvs) == config.num_layers
  # The ordinary forward's own key/value projections, captured as it runs.
  _, state = model.apply({'params': params}, x, capture_intermediates=lambda m, _: (
      m.name in ('key', 'value')))
  # (Captured inside the scan over the blocks: stacked on axis 0.)
  inner = flax.traverse_util.flatten_dict(flax.core.unfreeze(state['intermediates']),
                                          sep='/')
  _, np_kvs = numpy_vit_fn(checkpoint.load_npz(path), x, with_kv=True)
  shape = (2, config.num_tokens, config.num_heads, config.head_dim)
  for i, (k, v) in enumerate(kvs):
    prefix = 'Transformer/encoderblock/MultiHeadDotProductAttention_1/'
    for name, got, ref in (('key', k, np_kvs[i][0]), ('value', v, np_kvs[i][1])):
      assert got.shape == shape
      np.testing.assert_allclose(got, inner[prefix + name + '/__call__'][0][i],
                                 rtol=0, atol=1e-6)
      np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_image_path_passes_no_gradient_to_the_backbone(tiny_checkpoint):
  config, params = checkpoint.load(tiny_checkpoint())
  model = models_vit.VisionTransformer(config)
  x = images(2, config.image_size)

  def loss(params, x):
    kvs = model.apply({'params': params}, x, method=models_vit.VisionTransformer.image_path)
    return sum(jnp.sum(k ** 2) + jnp.sum(jnp.sin(v)) for k, v in kvs)

  assert float(loss(params, x)) != 0
  g_params, g_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  leaves = list(layouts.flatten(g_params).values())
  assert len(leaves) == len(layouts.flatten(params))
  assert all(not np.any(np.asarray(g)) for g in leaves)
  assert not np.any(np.asarray(g_images))
  # Whereas the plain classifier does pass gradients into the same parameters.
  full = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))(params)
  assert np.any(np.asarray(full['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']
                           ['kernel'][0]))


def test_image_path_stochastic_depth(tiny_checkpoint):
  config, params = checkpoint.load(tiny_checkpoint(depth=3))
  model = models_vit.VisionTransformer(config)
  x = images(8, config.image_size)
  run = lambda rate, rng: model.apply({'params': params}, x, rate, rng,
                                      method=models_vit.VisionTransformer.image_path)
  plain = run(0.0, None)
  a, b = run(0.5, jax.random.PRNGKey(1)), run(0.5, jax.random.PRNGKey(1))
  c = run(0.5, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(run(0.5, None)[2][0], plain[2][0])  # No rng: no drop.
  np.testing.assert_array_equal(a[0][0], plain[0][0])  # Block 0's input is untouched.
  np.testing.assert_array_equal(a[2][0], b[2][0])
  assert not np.allclose(a[2][0], plain[2][0])
  assert not np.allclose(a[2][0], c[2][0])


def test_block_drop_rate_is_timms_linear_schedule():
  assert [models_vit.block_drop_rate(i, 5, 0.1) for i in range(5)] == pytest.approx(
      [0.0, 0.025, 0.05, 0.075, 0.1])
  assert models_vit.block_drop_rate(0, 1, 0.1) == 0.0


def test_softmax_matches_jax_and_its_gradient():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 3
  np.testing.assert_allclose(models_vit.softmax(x), jax.nn.softmax(x), atol=1e-7)
  f = lambda fn: jax.grad(lambda x: jnp.sum(fn(x) * jnp.arange(5.0)))(x)
  np.testing.assert_allclose(f(models_vit.softmax), f(jax.nn.softmax), atol=1e-6)


def test_bfloat16_activations_run_and_stay_close_to_float32(tiny_checkpoint):
  path = tiny_checkpoint(depth=2, width=48, heads=4, mlp=96, pre_logits=False)
  config, params = checkpoint.load(path)
  x = images(2, config.image_size)
  f32 = models_vit.VisionTransformer(config).apply({'params': params}, x)
  bf16_config = dataclasses.replace(config, dtype=jnp.bfloat16)
  model = models_vit.VisionTransformer(bf16_config)
  bf16 = model.apply({'params': params}, x)
  assert bf16.dtype == jnp.bfloat16
  err = np.max(np.abs(np.asarray(bf16, np.float32) - f32)) / np.max(np.abs(f32))
  assert err <= BF16_TOL, err
  kvs = model.apply({'params': params}, x, method=models_vit.VisionTransformer.image_path)
  assert {k.dtype for kv in kvs for k in kv} == {jnp.dtype(jnp.bfloat16)}
  # Parameters stay float32; only activations are bfloat16.
  fresh = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  assert {l.dtype for l in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('width,depth,heads,mlp,patch,image', [
    (8, 1, 1, 16, 4, 8), (12, 3, 3, 24, 2, 6)])
def test_small_models_build_and_run(width, depth, heads, mlp, patch, image):
  config = models_vit.ViTConfig(width, depth, heads, mlp, patch, image, num_classes=3)
  model = models_vit.VisionTransformer(config)
  x = images(2, image)
  # `init` builds exactly the checkpoint layout (shapes only: compiling the random
  # initialisers is slow on CPU) ...
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  flat = random_vit.make(width, depth, heads, mlp, patch, image, classes=3,
                         pre_logits=False)
  assert {k: v.shape for k, v in layouts.flatten(shapes).items()} == {
      k: v.shape for k, v in flat.items()} == checkpoint.expected_shapes(config)
  assert config.num_tokens == 1 + (image // patch) ** 2
  # ... and the model runs on such parameters.
  params = layouts.nest(flat)
  logits = model.apply({'params': params}, x)
  assert logits.shape == (2, 3)
  assert np.all(np.isfinite(logits))
  kvs = model.apply({'params': params}, x, method=models_vit.VisionTransformer.image_path)
  assert [k.shape for k, _ in kvs] == [(2, config.num_tokens, heads, width // heads)] * depth


def test_std_conv_is_a_conv_with_a_standardised_kernel():
  """StdConv = nn.Conv('SAME', no bias) on (W - mean) / (std + 1e-5) per output channel."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 9, 5)).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, 5, 4)) * 3 + 1).astype(np.float32)
  conv = models_resnet.StdConv(4, 3, strides=2)
  got = conv.apply({'params': {'kernel': kernel}}, x)
  k64 = kernel.astype(np.float64)
  mean, std = k64.mean(axis=(0, 1, 2)), k64.std(axis=(0, 1, 2))
  standardised = ((k64 - mean) / (std + 1e-5)).astype(np.float32)
  want = flax.linen.Conv(4, (3, 3), strides=2, padding='SAME', use_bias=False).apply(
      {'params': {'kernel': standardised}}, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # Scaling or shifting a channel's weights changes nothing.
  np.testing.assert_allclose(
      conv.apply({'params': {'kernel': kernel * 7 - 2}}, x), got, rtol=0, atol=1e-4)


def test_hybrid_stem_feeds_a_16x_smaller_grid_to_the_patch_embedding():
  """R50's first three stages: 64 px -> a 4x4 grid of 4*4*width channels (stride 16)."""
  config = models_vit.ViTConfig(32, 1, 2, 64, 1, 64, resnet=models_resnet.ResNetConfig(
      (1, 1, 1), width=32))
  assert config.patch_stride == 16 and config.num_tokens == 1 + 16
  model = models_vit.VisionTransformer(config)
  x = images(2, 64)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  features = model.apply({'params': params}, x, method=models_vit.VisionTransformer.stem)
  assert features.shape == (2, 4, 4, 4 * 4 * 32)
  assert model.apply({'params': params}, x, method=models_vit.VisionTransformer.tokens
                     ).shape == (2, 17, 32)


def test_gap_classifier_has_no_class_token_and_pools_the_mean():
  config = models_vit.ViTConfig(32, 2, 2, 64, 8, 32, num_classes=3, classifier='gap')
  assert config.num_tokens == 16 and config.num_prefix_tokens == 0
  model = models_vit.VisionTransformer(config)
  x = images(2, 32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert 'cls' not in params
  params['head']['kernel'] = np.random.default_rng(0).standard_normal((32, 3)).astype(
      np.float32)
  encoded = model.apply({'params': params},
                        model.apply({'params': params}, x,
                                    method=models_vit.VisionTransformer.tokens),
                        method=lambda m, t: m.Transformer(t))
  want = encoded.mean(axis=1) @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(model.apply({'params': params}, x), want, atol=1e-5)
  with pytest.raises(ValueError, match='classifier='):
    models_vit.ViTConfig(32, 2, 2, 64, 8, 32, classifier='map')
