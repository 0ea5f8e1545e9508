"""Feature cache, deferred evaluation and the image-path memory modes (issue 6).

Tiny random backbones (width 32, 2 blocks, patch 8, 32px) keep this file fast.
"""
import functools
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synqt_jax.data import batching
from synqt_jax.data import data_config
from synqt_jax.data import sources
from synqt_jax.models import methods
from synqt_jax.models import recompute
from synqt_jax.models import synqt
from synqt_jax.testing import random_vit
from synqt_jax.training import deferred_eval
from synqt_jax.training import feature_cache
from synqt_jax.training import feature_cache_files
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts

NUM_CLASSES = 5
BATCH = 16
NORMALIZATION = 'imagenet'
SEED = 7


def tiny_method(**config):
  """(method, frozen) over a headless random ViT; image-path drop path off."""
  flat = random_vit.make(width=32, depth=2, heads=2, mlp=64, patch=8, image=32,
                         classes=1, pre_logits=False)
  flat = {k: v for k, v in flat.items() if not k.startswith('head/')}
  config = dict(dict(token_nums=2, image_drop_path=False), **config)
  method = methods.SynQT(checkpoint.vit_config(flat),
                         synqt.SynQTConfig(num_classes=NUM_CLASSES, **config))
  return method, {'backbone': layouts.nest(flat)}


def random_source(num_examples, seed):
  rng = np.random.default_rng(seed)
  return sources.ArraySource(
      rng.integers(0, 256, (num_examples, 32, 32, 3), np.uint8),
      rng.integers(0, NUM_CLASSES, num_examples), NUM_CLASSES, name=f'random{seed}')


@pytest.fixture(scope='module')
def setup():
  method, frozen = tiny_method()
  source = random_source(40, seed=0)  # 40 = 2 x 16 + 8: padded last batch.
  return method, frozen, flax.jax_utils.replicate(frozen), source


def build(setup, **kwargs):
  method, _, replicated, source = setup
  return feature_cache.build(method, replicated, source,
                             normalization=NORMALIZATION, batch_size=24,
                             **kwargs)


def data_fingerprint(frozen, method, **data):
  return feature_cache.fingerprint(
      backbone_digest=feature_cache.backbone_digest(frozen), vit=method.vit,
      data_config=data_config.default_data_config(
          source='folder', task='cifar100', root='/data', image_size=32, **data),
      split='train800val200')


# Training on the cache = training online.


def train(method, frozen, batches, inputs, apply, steps=20):
  """AdamW on the masked mean cross-entropy; returns per-step losses and params."""
  params = method.init(jax.random.PRNGKey(0), frozen, None)
  step = train_step(apply)
  opt_state, losses = OPTIMIZER.init(params), []
  for i, batch in zip(range(steps), batches):
    # As the trainer passes them: bfloat16 K/V as their bits (apply_kv reads them).
    params, opt_state, loss = step(params, opt_state, frozen, batch[inputs][0],
                                   batch['label'][0], batch['mask'][0],
                                   jax.random.PRNGKey(100 + i))
    losses.append(float(loss))
  return np.array(losses), params


OPTIMIZER = optax.adamw(1e-3, weight_decay=1e-2)


@functools.lru_cache(maxsize=None)
def train_step(apply):
  """One jitted AdamW step of `apply` (method.apply or method.apply_kv)."""

  def loss_fn(params, frozen, x, label, mask, rng):
    dropout, drop_path = jax.random.split(rng)
    logits = apply(params, frozen, x, train=True,
                   rngs={'dropout': dropout, 'drop_path': drop_path})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    return jnp.sum(mask * losses) / jnp.sum(mask)

  @jax.jit
  def step(params, opt_state, frozen, x, label, mask, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x, label, mask,
                                              rng)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@pytest.fixture(scope='module')
def online_run(setup):
  method, frozen, _, source = setup
  batches = batching.train_batches(source, BATCH, seed=SEED,
                                   normalization=NORMALIZATION)
  return train(method, frozen, batches, 'image', method.apply)


@pytest.mark.parametrize('storage_dtype, loss_rtol, param_atol', [
    ('float32', 1e-5, 1e-5),
    # bfloat16 rounds K/V to 8 significant bits (relative error <= 2^-9).
    ('bfloat16', 1e-2, 1e-2),
])
def test_cache_training_equals_online_training(setup, online_run, storage_dtype,
                                               loss_rtol, param_atol):
  method, frozen, _, _ = setup
  cache = build(setup, storage_dtype=storage_dtype)
  losses, params = train(method, frozen, cache.batches(BATCH, seed=SEED), 'kv',
                         method.apply_kv)
  online_losses, online_params = online_run
  np.testing.assert_allclose(losses, online_losses, rtol=loss_rtol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=param_atol),
               params, online_params)


# Batches.


def take(batches, steps):
  return [next(batches) for _ in range(steps)]


def assert_same_batches(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.keys() == e.keys()
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), e[key], err_msg=key)


def test_cached_batches_are_train_batches_with_kv(setup):
  method, frozen, _, source = setup
  steps = 7  # Two epochs and a step, across two padded batches.
  cached = take(build(setup).batches(BATCH, seed=SEED), steps)
  online = take(batching.train_batches(
      source, BATCH, seed=SEED, normalization=NORMALIZATION), steps)
  image_kv = jax.jit(method.image_kv)
  for c, o in zip(cached, online):
    np.testing.assert_array_equal(c['label'], o['label'])
    np.testing.assert_array_equal(c['mask'], o['mask'])
    assert c['kv'].shape == (1, BATCH, 2, 2, 17, 2, 16)
    # Padding rows too: they hold the K/V of the padding image.
    np.testing.assert_allclose(c['kv'][0], image_kv(frozen, o['image'][0]),
                               rtol=1e-5, atol=1e-6)


def test_batches_resume_at_any_step(setup):
  cache = build(setup)
  stream = take(cache.batches(BATCH, seed=SEED), 8)
  for start in (1, 3, 5):
    assert_same_batches(take(cache.batches(BATCH, seed=SEED, start_step=start),
                             8 - start), stream[start:])


def test_host_disk_and_device_modes_give_identical_batches(setup, tmp_path):
  method, frozen, _, _ = setup
  fingerprint = data_fingerprint(frozen, method)
  expected = take(build(setup, mode='host').batches(BATCH, seed=SEED), 4)
  for mode in ('disk', 'device'):
    cache = build(setup, mode=mode, directory=str(tmp_path),
                  fingerprint=fingerprint)
    assert_same_batches(take(cache.batches(BATCH, seed=SEED), 4), expected)


def test_device_cache_is_filled_a_few_rows_at_a_time(setup, tmp_path, monkeypatch):
  """No whole-shard host array: rows reach the device DEVICE_COPY_ROWS at a time."""
  method, frozen, _, _ = setup
  copies = []
  write = feature_cache._write_shard_rows
  monkeypatch.setattr(feature_cache, 'DEVICE_COPY_ROWS', 3)
  monkeypatch.setattr(feature_cache, '_write_shard_rows',
                      lambda shard, rows, start: copies.append(len(rows)) or
                      write(shard, rows, start))
  cache = build(setup, mode='device', directory=str(tmp_path),
                fingerprint=data_fingerprint(frozen, method))
  rows = cache.num_examples + 1
  assert copies == [3] * (rows // 3) + ([rows % 3] if rows % 3 else [])
  expected = take(build(setup, mode='host').batches(BATCH, seed=SEED), 2)
  assert_same_batches(take(cache.batches(BATCH, seed=SEED), 2), expected)


def test_build_steps_are_bounded_in_bytes_and_build_the_same_rows(setup, monkeypatch):
  """Rows of 3 images' K/V at a time, padding row included, equal one big batch's
  (to round-off: XLA:CPU blocks a matmul by its batch)."""
  method, _, _, _ = setup
  row_bytes = 4 * int(np.prod(method.cache_row_shape))
  expected = build(setup, mode='host')
  monkeypatch.setattr(feature_cache, 'BUILD_BYTES_PER_DEVICE', 3 * row_bytes + 1)
  steps = []
  image_kv = feature_cache._pmapped_image_kv
  monkeypatch.setattr(feature_cache, '_pmapped_image_kv', lambda *a: (
      lambda frozen, images: steps.append(images.shape[1]) or image_kv(*a)(frozen, images)))
  cache = build(setup, mode='host')
  assert steps == [3] * 14  # 41 rows (40 + padding) in steps of 3.
  np.testing.assert_allclose(cache.kv, expected.kv, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cache.labels, expected.labels)


def test_build_batch_size_keeps_a_multiple_of_the_devices():
  mb = 2 ** 20
  assert feature_cache.build_batch_size(256, 2.4 * mb, 1) == 53  # ViT-S/14 at 112 px.
  assert feature_cache.build_batch_size(256, 14.5 * mb, 8) == 64  # ViT-B/16 at 224.
  assert feature_cache.build_batch_size(256, 0.1 * mb, 8) == 256  # Small rows: as asked.
  assert feature_cache.build_batch_size(256, 500 * mb, 4) == 4  # One row per device.


@pytest.mark.parametrize('mode', ['host', 'disk'])
def test_host_batches_reach_the_cpu_device_without_a_copy(setup, tmp_path, mode):
  """64-byte aligned K/V: XLA:CPU reads them in place (a copy cost ~25% of a step)."""
  method, frozen, _, _ = setup
  cache = build(setup, mode=mode, directory=str(tmp_path),
                fingerprint=data_fingerprint(frozen, method))
  for batch in take(cache.batches(BATCH, seed=SEED), 3):
    kv = batch['kv'][0]
    assert kv.ctypes.data % 64 == 0
    assert jax.device_put(kv).unsafe_buffer_pointer() == kv.ctypes.data


def test_a_finite_stream_frees_the_cache_with_its_last_batch(setup):
  """The run's final evaluation gets the cache's memory (2.4 GB for DINOv2-S/14)."""
  cache = build(setup)
  alive = weakref.ref(cache)
  batches = cache.batches(BATCH, seed=SEED, num_steps=2)
  del cache
  next(batches)
  gc.collect()
  assert alive() is not None
  next(batches)
  gc.collect()
  assert alive() is None


def test_batches_of_one_host_of_two(setup):
  """Host 1 of 2 gets the second half of each global batch, [devices, b, ...]."""
  cache = build(setup)
  whole = take(cache.batches(BATCH, seed=SEED), 3)
  half = take(cache.batches(BATCH, seed=SEED, process_index=1, process_count=2,
                            local_device_count=2), 3)
  for w, h in zip(whole, half):
    for key in w:
      np.testing.assert_array_equal(
          h[key], w[key][0, BATCH // 2:].reshape(h[key].shape), err_msg=key)


def test_device_mode_over_two_devices():
  """Each device holds half the rows; the gather still yields train_batches order."""
  script = textwrap.dedent(f"""
      import flax.jax_utils, jax, numpy as np
      assert jax.local_device_count() == 2
      from synqt_jax.training import feature_cache
      sys_path = {os.path.dirname(__file__)!r}
      import sys; sys.path.insert(0, sys_path)
      import test_feature_cache as t
      method, frozen = t.tiny_method()
      source = t.random_source(41, seed=1)  # 42 rows with the padding row.
      caches = [feature_cache.build(method, flax.jax_utils.replicate(frozen),
                                    source, normalization='imagenet', mode=mode,
                                    batch_size=24)
                for mode in ('host', 'device')]
      assert caches[1].shards.shape[:2] == (2, 21)
      for a, b in zip(*(c.batches(16, seed=3, num_steps=4) for c in caches)):
        for key in a:
          np.testing.assert_array_equal(np.asarray(b[key]), a[key], key)
      print('OK')
  """)
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.stdout.strip().endswith('OK'), result.stderr[-3000:]


# Reuse across runs.


def test_disk_cache_is_reused_while_the_fingerprint_matches(setup, tmp_path):
  method, frozen, _, _ = setup
  fingerprint = data_fingerprint(frozen, method)
  first = build(setup, mode='disk', directory=str(tmp_path),
                fingerprint=fingerprint)
  assert first.provenance == 'building (no cache yet)'
  again = build(setup, mode='disk', directory=str(tmp_path),
                fingerprint=fingerprint)
  assert again.provenance.startswith('reused ')
  np.testing.assert_array_equal(again.kv, first.kv)
  np.testing.assert_array_equal(again.labels, first.labels)

  changed = data_fingerprint(frozen, method, normalization='inception')
  rebuilt = build(setup, mode='host', directory=str(tmp_path),
                  fingerprint=changed)
  assert rebuilt.provenance == (
      "rebuilding, the inputs changed: data.normalization 'imagenet' -> "
      "'inception'")
  bf16 = build(setup, mode='host', directory=str(tmp_path),
               fingerprint=changed, storage_dtype='bfloat16')
  assert bf16.provenance == ("rebuilding, the inputs changed: storage_dtype "
                             "'float32' -> 'bfloat16'")
  assert bf16.kv.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.kv.astype(np.float32), first.kv, rtol=2**-8)
  with open(tmp_path / 'train.json') as f:
    assert json.load(f)['fields']['storage_dtype'] == 'bfloat16'


def test_a_changed_backbone_or_an_interrupted_build_rebuilds(setup, tmp_path):
  method, frozen, _, _ = setup
  fingerprint = data_fingerprint(frozen, method)
  build(setup, mode='disk', directory=str(tmp_path), fingerprint=fingerprint)
  other = jax.tree.map(lambda x: x + 1, frozen)
  changed = data_fingerprint(other, method)
  assert build(setup, mode='disk', directory=str(tmp_path),
               fingerprint=changed).provenance.startswith(
                   'rebuilding, the inputs changed: backbone_digest ')
  os.remove(tmp_path / 'train.json')  # As if the next build had been killed.
  (tmp_path / 'train.kv.npy').rename(tmp_path / 'train.kv.npy.partial')
  assert build(setup, mode='disk', directory=str(tmp_path),
               fingerprint=changed).provenance == (
                   'building (the last build was interrupted)')


def _built_disk_cache(setup, directory):
  """(fingerprint, K/V copied to memory) of a disk cache built in `directory`."""
  method, frozen, _, _ = setup
  fingerprint = data_fingerprint(frozen, method)
  return fingerprint, np.array(build(setup, mode='disk', directory=str(directory),
                                     fingerprint=fingerprint).kv)


def test_disk_cache_changed_at_the_same_size_is_rebuilt(setup, tmp_path):
  """Issue 15, defect 6: overwritten rows were reused (accuracy 0.5 for 0.99)."""
  fingerprint, want = _built_disk_cache(setup, tmp_path)
  path = tmp_path / 'train.kv.npy'
  size = path.stat().st_size
  with open(path, 'r+b') as f:
    f.seek(size - 3000)
    f.write(np.random.default_rng(0).bytes(2000))
  assert path.stat().st_size == size
  rebuilt = build(setup, mode='disk', directory=str(tmp_path),
                  fingerprint=fingerprint)
  assert rebuilt.provenance.startswith(
      'rebuilding, 1 chunk(s) of rows were changed after they were written')
  np.testing.assert_array_equal(rebuilt.kv, want)
  (tmp_path / 'train.labels.npy').write_bytes(
      (tmp_path / 'train.labels.npy').read_bytes()[:-4] + b'\x07\0\0\0')
  assert build(setup, mode='disk', directory=str(tmp_path),
               fingerprint=fingerprint).provenance == (
                   'rebuilding, the labels file was changed after it was written')


def test_truncated_disk_cache_is_rebuilt(setup, tmp_path):
  """Issue 15, defect 6: 'mmap length is greater than file size', never rebuilt."""
  fingerprint, want = _built_disk_cache(setup, tmp_path)
  path = tmp_path / 'train.kv.npy'
  os.truncate(path, path.stat().st_size // 2)
  rebuilt = build(setup, mode='disk', directory=str(tmp_path),
                  fingerprint=fingerprint)
  assert rebuilt.provenance.startswith(
      'rebuilding, the cache files are unreadable or cut short (ValueError: ')
  np.testing.assert_array_equal(rebuilt.kv, want)
  assert build(setup, mode='disk', directory=str(tmp_path),
               fingerprint=fingerprint).provenance.startswith('reused ')


def test_chunk_checksums_cover_every_row(monkeypatch):
  monkeypatch.setattr(feature_cache_files, 'CHUNK_BYTES', 3 * 4 * 5)
  rows = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
  digests = feature_cache_files._chunk_digests(rows, 'Checksumming')
  assert len(digests) == 3  # Rows 0-2, 3-5, 6.
  rows[6, 4] += 1  # The last value of the last, short chunk.
  changed = feature_cache_files._chunk_digests(rows, 'Verifying')
  assert changed[:2] == digests[:2] and changed[2] != digests[2]


# Deferred evaluation.


def test_deferred_evaluation_equals_separate_evaluations(setup):
  method, frozen, replicated, _ = setup
  test_source = random_source(37, seed=2)
  parameter_sets = [method.init(jax.random.PRNGKey(s), frozen, None)
                    for s in range(3)]
  scores = deferred_eval.evaluate(method, replicated, parameter_sets,
                                  test_source, BATCH,
                                  normalization=NORMALIZATION)

  @jax.pmap
  def correct_count(params, frozen, batch):  # What the trainer's eval does.
    logits = method.apply(params, frozen, batch['image'])
    return ((jnp.argmax(logits, -1) == batch['label']) * batch['mask']).sum()

  separate = []
  for params in parameter_sets:
    params = flax.jax_utils.replicate(params)
    separate.append(sum(
        int(correct_count(params, replicated, batch)[0])
        for batch in batching.eval_batches(
            test_source, BATCH, normalization=NORMALIZATION)))
  assert scores.count == 37
  assert scores.correct == tuple(separate)
  assert scores.accuracies == tuple(c / 37 for c in separate)
  assert len(set(scores.correct)) > 1  # The sets really differ.


# Memory modes of online training.


@pytest.mark.parametrize('batch', [8, 12])  # 8 pieces of 1 row; 6 pieces of 2.
def test_recompute_mode_has_the_same_gradients_and_less_memory(batch):
  """Same drop paths (image, query, head); query dropout off (its stream differs)."""
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  labels = jnp.arange(batch) % NUM_CLASSES
  results = {}
  for mode in synqt.IMAGE_PATH_MEMORY:
    method, frozen = tiny_method(image_drop_path=True, dropout=0.0,
                                 image_path_memory=mode)
    params = method.init(jax.random.PRNGKey(0), frozen, None)

    def loss(params):
      logits = method.apply(params, frozen, images, train=True, rngs={
          'dropout': jax.random.PRNGKey(2), 'drop_path': jax.random.PRNGKey(3)})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    results[mode] = (compiled(params),
                     compiled.memory_analysis().temp_size_in_bytes)
  (loss, grads), keep_kv_bytes = results['keep_kv']
  (recompute_loss, recompute_grads), recompute_bytes = results['recompute']
  assert float(recompute_loss) == pytest.approx(float(loss), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               recompute_grads, grads)
  assert recompute_bytes < keep_kv_bytes


@pytest.mark.parametrize('batch, backend, images', [
    (64, 'cpu', 2), (64, 'gpu', 8), (256, 'tpu', 32), (12, 'cpu', 2),
    (9, 'cpu', 1), (9, 'gpu', 3), (7, 'gpu', 1), (1, 'cpu', 1)])
def test_recompute_pieces_are_an_eighth_of_the_batch_and_two_images_on_a_cpu(
    batch, backend, images):
  assert recompute.piece_images(batch, backend) == images


def test_memory_mode_is_checked():
  with pytest.raises(ValueError, match='image_path_memory'):
    synqt.SynQTConfig(num_classes=2, image_path_memory='offload')


def test_batch_specs_are_the_batches_shapes(setup):
  """What the train step is compiled for before any batch exists (steps.compile_train_steps)."""
  method, _, _, source = setup
  shapes = lambda batch: {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()}
  online = next(batching.train_batches(source, BATCH, seed=SEED,
                                       normalization=NORMALIZATION))
  assert shapes(batching.train_batch_spec(BATCH, 32)) == shapes(online)
  for dtype in ('float32', 'bfloat16'):
    cached = next(build(setup, mode='host', storage_dtype=dtype).batches(BATCH, seed=SEED))
    assert shapes(feature_cache.batch_spec(BATCH, method.cache_row_shape, dtype)) == shapes(cached)
