"""Tests of the baselines (and SynQT) through the shared method interface, on a tiny ViT."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synqt_jax.models import baselines
from synqt_jax.models import methods
from synqt_jax.models import synqt
from synqt_jax.models import vit as models_vit
from synqt_jax.testing import random_vit
from synqt_jax.training import train
from synqt_jax.weights import checkpoint
from synqt_jax.weights import export
from synqt_jax.weights import layouts
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import tiny_config

NUM_CLASSES = 5
METHODS = ('linear', 'full', 'lora', 'synqt')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """`(vit, frozen)`: a random headless ViT (width 32, 2 blocks, patch 8, 32 px)."""
  path = tmp_path_factory.mktemp('vit') / 'tiny.npz'
  random_vit.write(path, width=32, depth=2, heads=4, mlp=64, patch=8, image=32,
                   classes=10)
  vit, backbone = checkpoint.load(str(path), headless=True)
  return vit, {'backbone': backbone}


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(rng.integers(0, NUM_CLASSES, 8))


def make_method(name, vit):
  return {
      'linear': baselines.LinearProbe(vit, NUM_CLASSES),
      'full': baselines.FullFineTune(vit, NUM_CLASSES),
      'lora': baselines.LoRA(vit, NUM_CLASSES, rank=4, alpha=8),
      'synqt': methods.SynQT(vit, synqt.SynQTConfig(NUM_CLASSES)),
  }[name]


@functools.partial(jax.jit, static_argnames=('method', 'train'))
def logits_of(method, trainable, frozen, images, train=False, rngs=None):
  return method.apply(trainable, frozen, images, train=train, rngs=rngs)


def loss_fn(method, trainable, frozen, images, labels, train=False, rngs=None):
  logits = method.apply(trainable, frozen, images, train=train, rngs=rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()
  return loss, logits


def grad_of(argnums):
  """Jitted `(loss, logits), grads` w.r.t. argument `argnums` of `loss_fn`."""
  return jax.jit(jax.value_and_grad(loss_fn, argnums, has_aux=True),
                 static_argnames=('method', 'train'))


grad_trainable, grad_frozen = grad_of(1), grad_of(2)
OPTIMIZER = optax.adamw(3e-3)


@functools.partial(jax.jit, static_argnames='method')
def train_step(method, trainable, opt_state, frozen, images, labels, rng):
  """An adamw step that differentiates `trainable` only, as the trainer does."""
  rngs = dict(zip(('dropout', 'drop_path'), jax.random.split(rng)))
  (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
      method, trainable, frozen, images, labels, True, rngs)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, grads, loss


def apply_frozen(method, frozen):
  """What `apply` is given: full fine-tuning reads `frozen` at init only."""
  return {} if isinstance(method, baselines.FullFineTune) else frozen


def init_and_train(method, frozen, images, labels, steps):
  """`(trainable before, after, opt_state, last grads, losses)` after `steps` steps.

  Every step draws the same dropout/drop-path masks, so the losses are comparable.
  """
  initial = method.init(jax.random.PRNGKey(0), frozen, images)
  trainable, opt_state, losses = initial, OPTIMIZER.init(initial), []
  for _ in range(steps):
    trainable, opt_state, grads, loss = train_step(
        method, trainable, opt_state, apply_frozen(method, frozen), images, labels,
        jax.random.PRNGKey(0))
    losses.append(float(loss))
  return initial, trainable, opt_state, grads, losses


@pytest.mark.parametrize('name', METHODS)
def test_training_lowers_the_loss_and_the_optimizer_mirrors_trainable(
    name, tiny, batch):
  vit, frozen = tiny
  method = make_method(name, vit)
  _, trainable, opt_state, grads, losses = init_and_train(method, frozen, *batch, 10)
  assert losses[-1] < 0.9 * losses[0], losses

  # Gradients and optimizer state cover `trainable` exactly: no frozen backbone
  # in them (for full fine-tuning the backbone *is* in `trainable`).
  structure = jax.tree.structure(trainable)
  assert jax.tree.structure(grads) == structure
  adam = opt_state[0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(adam.nu) == structure
  state = jax.tree.leaves(opt_state)
  moments = sum(x.size for x in state if x.ndim > 0)
  assert moments == 2 * methods.trainable_count(trainable)
  assert all(x.size == 1 for x in state if x.ndim == 0)  # The step counts.


@pytest.mark.parametrize('name', ['linear', 'lora'])
def test_no_gradient_reaches_the_frozen_backbone(name, tiny, batch):
  vit, frozen = tiny
  method = make_method(name, vit)
  trainable = method.init(jax.random.PRNGKey(0), frozen, batch[0])
  if name == 'lora':  # With b = 0, W's gradient would be zero even unstopped.
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
  _, grads = grad_frozen(method, trainable, frozen, *batch)
  assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_lora_starts_as_the_backbone_and_departs_after_a_step(tiny, batch):
  vit, frozen = tiny
  lora, probe = make_method('lora', vit), make_method('linear', vit)
  initial, trained, _, _, _ = init_and_train(lora, frozen, *batch, 1)

  def gap(trainable):
    return np.abs(logits_of(lora, trainable, frozen, batch[0])
                  - logits_of(probe, {'head': trainable['head']}, frozen, batch[0]))

  assert not np.any(gap(initial))
  assert all(np.any(p['b']) for block in trained['lora'].values()
             for p in block.values())
  assert gap(trained).max() > 1e-6


def test_lora_merges_into_query_and_value_only(tiny):
  vit, frozen = tiny
  lora = jax.tree.map(jnp.ones_like, make_method('lora', vit).init(
      jax.random.PRNGKey(0), frozen, None)['lora'])
  merged = layouts.flatten(baselines.merge_lora(frozen['backbone'], lora, 0.5))
  original = layouts.flatten(frozen['backbone'])
  assert merged.keys() == original.keys()
  changed = {k for k in original if not np.array_equal(merged[k], original[k])}
  assert changed == {
      f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{p}/kernel'
      for i in range(vit.num_layers) for p in ('query', 'value')}
  key = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
  rank = lora['encoderblock_0']['query']['a'].shape[1]
  np.testing.assert_allclose(merged[key] - original[key], 0.5 * rank, rtol=1e-6)


def test_full_fine_tune_trains_the_whole_backbone(tiny, batch):
  vit, frozen = tiny
  initial, trained, _, grads, _ = init_and_train(
      make_method('full', vit), frozen, *batch, 1)
  assert all(np.any(g) for g in jax.tree.leaves(grads['backbone']))
  unchanged = jax.tree.map(np.array_equal, trained['backbone'], frozen['backbone'])
  assert not any(jax.tree.leaves(unchanged))
  # `init` copied the backbone: the caller's pre-trained tree is untouched.
  assert all(jax.tree.leaves(jax.tree.map(
      np.array_equal, initial['backbone'], frozen['backbone'])))


def test_full_fine_tune_drop_path_is_stochastic_only_in_training(tiny, batch):
  vit, frozen = tiny
  method = make_method('full', vit)
  trainable = method.init(jax.random.PRNGKey(0), frozen, batch[0])
  apply = lambda train, seed: np.asarray(logits_of(
      method, trainable, {}, batch[0], train, {'drop_path': jax.random.PRNGKey(seed)}))
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  np.testing.assert_array_equal(apply(True, 0), apply(True, 0))
  assert np.any(apply(True, 0) != apply(True, 1))


def test_drop_path_rates_rise_linearly_over_the_blocks(tiny, batch):
  """At r = 1, block 0 keeps rate 0 and block L-1 = 1 gets rate 1 (dropped entirely)."""
  vit, frozen = tiny
  method = baselines.FullFineTune(vit, NUM_CLASSES, drop_path=1.0)
  trainable = method.init(jax.random.PRNGKey(0), frozen, batch[0])
  logits = logits_of(method, trainable, {}, batch[0], True,
                     {'drop_path': jax.random.PRNGKey(0)})
  first_block = lambda m: models_vit.block_method(  # Block 0 of the stacked blocks.
      vit, jax.tree.map(lambda a: a[0], m.block_params), '__call__')
  first_block_only = lambda m, x: m.Transformer.encoder_norm(
      first_block(m)(m.tokens(x), (jnp.float32(1.0), None))[0])[:, 0]
  features = jax.jit(functools.partial(models_vit.VisionTransformer(vit).apply,
                                       method=first_block_only))(
      {'params': frozen['backbone']}, batch[0])
  expected = method.head.apply({'params': trainable['head']}, features)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['linear', 'full', 'lora'])
def test_bfloat16_activations(name, tiny, batch):
  vit, frozen = tiny
  method = make_method(name, dataclasses.replace(vit, dtype=jnp.bfloat16))
  trainable = method.init(jax.random.PRNGKey(0), frozen, batch[0])
  rngs = {'dropout': jax.random.PRNGKey(1), 'drop_path': jax.random.PRNGKey(2)}
  (_, logits), grads = grad_trainable(
      method, trainable, apply_frozen(method, frozen), *batch, True, rngs)
  assert logits.dtype == jnp.bfloat16 and logits.shape == (8, NUM_CLASSES)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g))
             for g in jax.tree.leaves(grads))


def test_trainable_counts_for_vit_b16_with_100_classes():
  """Computed with `jax.eval_shape`: no ViT-B array is ever allocated."""
  vit = models_vit.ViTConfig(hidden_size=768, num_layers=12, num_heads=12,
                             mlp_dim=3072, patch_size=16, image_size=224)
  d, layers, mlp, tokens, classes, rank = 768, 12, 3072, 197, 100, 8
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  backbone = jax.eval_shape(models_vit.VisionTransformer(vit).init,
                            jax.random.PRNGKey(0), images)['params']
  count = lambda method: methods.trainable_count(jax.eval_shape(
      method.init, jax.random.PRNGKey(0), {'backbone': backbone}, images))

  head = d * classes + classes
  block = 4 * d + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  vit_b = (16 * 16 * 3 * d + d) + d + tokens * d + layers * block + 2 * d
  lora = layers * len(baselines.LORA_TARGETS) * (d * rank + rank * d)
  assert (head, vit_b, lora) == (76_900, 85_798_656, 294_912)
  assert count(baselines.LinearProbe(vit, classes)) == 76_900
  assert count(baselines.LoRA(vit, classes, rank=rank, alpha=8)) == 371_812
  assert count(baselines.FullFineTune(vit, classes)) == 85_875_556


@pytest.mark.parametrize('name', ['linear', 'lora', 'full'])
def test_baselines_train_in_the_same_trainer(name, tmp_path, compilation_cache):
  """`--config.method=<baseline>`: same data, schedule, checkpoints, evaluation."""
  del compilation_cache  # Shared compiled programs across the session.
  config = tiny_config(**{'method': name, 'optim.epochs': 2, 'eval_every_epochs': 1})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results['test_accuracy'] <= 1.0
  assert len(results['evaluations']) == 2
  params, _ = export.load(str(tmp_path / 'export.npz'))
  expected = {'linear': {'head'}, 'lora': {'lora', 'head'},
              'full': {'backbone', 'head'}}[name]
  assert set(params) == expected
