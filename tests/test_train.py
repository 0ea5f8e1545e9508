"""The trainer: schedule and optimizer, the loss, devices and hosts, resume, learning."""
import functools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from synqt_jax import demo
from synqt_jax import predict
from synqt_jax.data import batching
from synqt_jax.models import methods
from synqt_jax.training import devices
from synqt_jax.training import host_memory
from synqt_jax.training import optimizer
from synqt_jax.training import state as state_lib
from synqt_jax.training import steps
from synqt_jax.training import train
from synqt_jax.weights import export
from training_runs import NO_DROPOUT
from training_runs import REPO
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import final_params
from training_runs import free_port
from training_runs import launch_env
from training_runs import losses
from training_runs import read_log
from training_runs import read_metrics
from training_runs import read_results
from training_runs import reproducible
from training_runs import run_launch
from training_runs import start_launch
from training_runs import tiny_config


def reference_lr(step, steps_per_epoch, lr, min_lr, epochs, warmup):
  """The reference's adjust_learning_rate, at t = i / len(loader) + epoch."""
  t = step / steps_per_epoch
  if t < warmup:
    return lr * t / warmup
  return min_lr + (lr - min_lr) * 0.5 * (
      1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


def vtab_optim(**overrides):
  return ml_collections.ConfigDict({**dict(
      lr=1e-3, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8, epochs=50,
      warmup_epochs=10, min_lr=1e-6), **overrides})


def test_learning_rate_schedule_matches_the_reference_formula():
  optim = vtab_optim()
  steps_per_epoch = batching.steps_per_epoch(1000, 64)
  schedule = optimizer.learning_rate_schedule(optim, steps_per_epoch)
  steps = [0, 1, 7, 16, 100, 159, 160, 161, 333, 500, 799]
  ours = [float(schedule(step)) for step in steps]
  want = [reference_lr(step, steps_per_epoch, 1e-3, 1e-6, 50, 10)
          for step in steps]
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-12)
  assert ours[0] == 0.0
  assert ours[steps.index(160)] == pytest.approx(1e-3)


def test_optimizer_step_matches_pytorch_adamw():
  """torch.optim.AdamW, written out: decay p *= 1 - lr*wd, then the Adam step."""
  optim = vtab_optim(epochs=4, warmup_epochs=1, weight_decay=0.05)
  steps_per_epoch = 2
  rng = np.random.default_rng(0)
  params = {'a': rng.standard_normal((3, 4)).astype(np.float32),
            'b': {'c': rng.standard_normal(5).astype(np.float32)}}
  tx = optimizer.create(
      optim, optimizer.learning_rate_schedule(optim, steps_per_epoch))
  opt_state = tx.init(params)
  ours = params
  torch_params = {k: np.asarray(v, np.float64)
                  for k, v in {'a': params['a'], 'c': params['b']['c']}.items()}
  m = {k: np.zeros_like(v) for k, v in torch_params.items()}
  v = {k: np.zeros_like(p) for k, p in torch_params.items()}
  for step in range(6):
    grads = {'a': rng.standard_normal((3, 4)).astype(np.float32),
             'b': {'c': rng.standard_normal(5).astype(np.float32)}}
    updates, opt_state = tx.update(grads, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    lr = reference_lr(step, steps_per_epoch, optim.lr, optim.min_lr,
                      optim.epochs, optim.warmup_epochs)
    for key, grad in (('a', grads['a']), ('c', grads['b']['c'])):
      p = torch_params[key]
      p *= 1 - lr * optim.weight_decay
      m[key] = optim.b1 * m[key] + (1 - optim.b1) * grad
      v[key] = optim.b2 * v[key] + (1 - optim.b2) * grad.astype(np.float64) ** 2
      denom = (np.sqrt(v[key]) / math.sqrt(1 - optim.b2 ** (step + 1))
               + optim.eps)
      p -= lr / (1 - optim.b1 ** (step + 1)) * m[key] / denom
    np.testing.assert_allclose(ours['a'], torch_params['a'], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(ours['b']['c'], torch_params['c'], rtol=2e-6,
                               atol=1e-7)


def test_sgd_weight_decay_matches_pytorch_sgd():
  """torch.optim.SGD(momentum, weight_decay), written out: g += wd * p, then
  buf = momentum * buf + g, p -= lr * buf (optax has no weight_decay for sgd)."""
  optim = vtab_optim(name='sgd', optax={'momentum': 0.9}, weight_decay=0.05,
                     epochs=4, warmup_epochs=1)
  steps_per_epoch = 2
  rng = np.random.default_rng(1)
  params = {'a': rng.standard_normal((3, 4)).astype(np.float32)}
  tx = optimizer.create(optim,
                        optimizer.learning_rate_schedule(optim, steps_per_epoch))
  opt_state = tx.init(params)
  ours, torch_p, buf = params, params['a'].astype(np.float64), None
  for step in range(6):
    grad = rng.standard_normal((3, 4)).astype(np.float32)
    updates, opt_state = tx.update({'a': grad}, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    lr = reference_lr(step, steps_per_epoch, optim.lr, optim.min_lr,
                      optim.epochs, optim.warmup_epochs)
    g = grad + optim.weight_decay * torch_p
    buf = g if buf is None else 0.9 * buf + g
    torch_p = torch_p - lr * buf
    np.testing.assert_allclose(ours['a'], torch_p, rtol=2e-6, atol=1e-7)
  assert optimizer.describe(optim) == (
      'optax.chain(optax.add_decayed_weights(0.05), optax.sgd(momentum=0.9))')


def test_loss_is_the_mean_over_real_examples_and_padding_is_ignored(
    tmp_path, compilation_cache):
  config = train.resolve_workdir_paths(tiny_config(**NO_DROPOUT), tmp_path)
  demo.prepare(config)
  method, frozen = methods.create_method(config)
  schedule = optimizer.learning_rate_schedule(config.optim, 7)
  state = devices.replicate(state_lib.create_train_state(
      method, frozen, optimizer.create(config.optim, schedule), 0, 32))
  frozen_replicated = devices.replicate(frozen)
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=schedule),
      axis_name=devices.AXIS)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  mask = (np.arange(16) < 5).astype(np.float32)
  updated = []
  for padding in (0.0, 100.0):  # Two batches that differ only in padding.
    images[5:], labels[5:] = padding, int(padding) % 10
    batch = {'image': images[None], 'label': labels[None], 'mask': mask[None]}
    new_state, metrics = p_train_step(state, frozen_replicated, batch)
    updated.append(new_state.params)
  logits = jax.jit(method.apply)(devices.unreplicate(state.params),
                                 frozen, images[:5])
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels[:5])
  np.testing.assert_allclose(metrics['loss'][0], want.mean(), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, *updated)


@pytest.mark.parametrize('overrides', [
    {'method': 'synqt'}, {'synqt.image_path_memory': 'recompute'},
    {'method': 'lora'}, {'method': 'linear'}])
def test_bfloat16_backbone_computes_as_float32_weights_rounded_once(
    tmp_path, compilation_cache, overrides):
  """backbone_dtype='bfloat16' holds the frozen weights rounded (half the
  bytes) and computes in the activation dtype: the loss and gradients are
  those of float32 weights rounded to bfloat16 beforehand."""
  config = train.resolve_workdir_paths(tiny_config(**{
      **NO_DROPOUT, **overrides, 'backbone_dtype': 'bfloat16'}), tmp_path)
  demo.prepare(config)
  method, frozen = methods.create_method(config)
  config.backbone_dtype = 'float32'
  _, full = methods.create_method(config)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert sum(x.nbytes for x in jax.tree.leaves(frozen)) * 2 == sum(
      x.nbytes for x in jax.tree.leaves(full))
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), full)
  params = method.init(jax.random.PRNGKey(0), frozen, None)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((1, 8, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, 10, (1, 8)).astype(np.int32),
           'mask': np.ones((1, 8), np.float32)}
  grads = jax.pmap(functools.partial(steps.gradients, method, params,
                                     jax.random.PRNGKey(1), 0),
                   axis_name=devices.AXIS)
  (loss, g), (want_loss, want_g), (full_loss, _) = (
      grads(devices.replicate(tree), batch) for tree in (frozen, rounded, full))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               g, want_g)
  # Rounding the weights moved the loss, by bfloat16's relative step at most.
  assert 0 < abs(float(loss[0]) - float(full_loss[0])) <= 1e-2 * float(full_loss[0])


def test_replicate_puts_the_host_array_itself_on_a_cpu_device():
  """One copy of the frozen weights: no stacked host copy, no device copy."""
  host = host_memory.aligned_empty((1024, 1024), np.float32)
  host[:] = np.arange(1 << 20).reshape(1024, 1024)
  replicated = devices.replicate({'w': host})['w']
  [shard] = replicated.addressable_shards
  assert replicated.shape == (1, 1024, 1024)
  assert shard.data.unsafe_buffer_pointer() == host.ctypes.data
  np.testing.assert_array_equal(devices.unreplicate({'w': replicated})['w'], host)


def assert_params_close(ours, want):
  """Equal up to float round-off, as Adam amplifies it over the steps.

  Adam moves a parameter by up to ~lr per step whatever its gradient's size,
  so where the true gradient is ~0 (SynQT's saturated query self-attention at
  initialisation) round-off from summing in another order makes the parameter
  random-walk by fractions of lr = 3e-3, while the losses agree to 1e-5.
  """
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-2),
               ours, want)


def test_same_trajectory_on_1_2_and_8_devices(tmp_path, compilation_cache):
  """Same global batch, stochastic layers off: same losses and parameters.

  (With dropout on, each device draws its own keys, so device counts differ.)
  """
  overrides = {**NO_DROPOUT, 'optim.epochs': 3}
  runs = {n: start_launch(tmp_path / f'devices_{n}', compilation_cache,
                          overrides, devices=n) for n in (1, 2, 8)}
  for n, process in runs.items():
    assert process.wait(300) == 0, read_log(tmp_path / f'devices_{n}')
  one = tmp_path / 'devices_1'
  assert len(losses(one)) == 21
  for n in (2, 8):
    workdir = tmp_path / f'devices_{n}'
    np.testing.assert_allclose(losses(workdir), losses(one), rtol=1e-5)
    assert_params_close(final_params(workdir), final_params(one))
    assert (read_results(workdir)['evaluations'] ==
            read_results(one)['evaluations'])


def test_two_processes_match_one_process_with_four_devices(tmp_path,
                                                           compilation_cache):
  """jax.distributed on localhost (gloo), dropout on: the same per-device keys."""
  address = f'localhost:{free_port()}'
  overrides = {'optim.epochs': 2}
  pair = [start_launch(
      tmp_path / 'two_hosts', compilation_cache, overrides, devices=2,
      extra_args=(f'--coordinator_address={address}', '--num_processes=2',
                  f'--process_id={i}'), log_name=f'launch_{i}.log')
          for i in range(2)]
  single = start_launch(tmp_path / 'one_host', compilation_cache, overrides,
                        devices=4)
  for i, process in enumerate(pair):
    assert process.wait(300) == 0, read_log(tmp_path / 'two_hosts',
                                            f'launch_{i}.log')
  assert single.wait(300) == 0, read_log(tmp_path / 'one_host')
  np.testing.assert_allclose(losses(tmp_path / 'two_hosts'),
                             losses(tmp_path / 'one_host'), rtol=1e-5)
  assert_params_close(final_params(tmp_path / 'two_hosts'),
                      final_params(tmp_path / 'one_host'))
  log = read_log(tmp_path / 'two_hosts', 'launch_0.log', tail=None)
  assert 'Devices: 4 in all, 2 on this host (process 0 of 2)' in log


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, compilation_cache):
  """An uninterrupted run of the fast tiny config (dropout on)."""
  workdir = tmp_path_factory.mktemp('reference')
  return workdir, run_launch(workdir, compilation_cache)


def wait_for_step(workdir, step, process, timeout=240):
  """Returns once metrics.jsonl shows `step`; fails if the run ends first."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, read_log(workdir)
    if os.path.exists(path):
      steps = [m['step'] for m in read_metrics(workdir)]
      if steps and max(steps) >= step:
        return
    time.sleep(0.005)
  pytest.fail(f'step {step} not reached in {timeout} s')


def assert_same_as_reference(workdir, reference_workdir):
  ours, want = final_params(workdir), final_params(reference_workdir)
  jax.tree.map(np.testing.assert_array_equal, ours, want)
  assert reproducible(read_metrics(workdir)) == reproducible(
      read_metrics(reference_workdir))
  with open(os.path.join(workdir, 'results.json')) as f, open(
      os.path.join(reference_workdir, 'results.json')) as g:
    assert json.load(f)['evaluations'] == json.load(g)['evaluations']


def test_killed_and_preempted_run_ends_bit_identical(tmp_path, reference_run,
                                                     compilation_cache):
  """SIGKILL at a random step, resume, SIGTERM at another, resume to the end."""
  reference_workdir, _ = reference_run
  workdir = tmp_path / 'interrupted'
  seed = random.randrange(1 << 30)
  kill_step, term_offset = np.random.default_rng(seed).integers([2, 1], [16, 10])
  print(f'seed {seed}: SIGKILL at step >= {kill_step}, SIGTERM {term_offset} '
        'steps past what the killed run had written')

  process = start_launch(workdir, compilation_cache)
  wait_for_step(workdir, kill_step, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (workdir / 'results.json').exists()

  # Steps past the killed run's last line come from the restarted run's
  # training loop, after it has installed its SIGTERM handler.
  term_step = min(max(m['step'] for m in read_metrics(workdir)) + term_offset,
                  41)
  process = start_launch(workdir, compilation_cache)
  wait_for_step(workdir, term_step, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(120) == 0, read_log(workdir)
  assert 'SIGTERM: saved the checkpoint at step' in read_log(workdir, tail=None)
  assert not (workdir / 'results.json').exists()

  run_launch(workdir, compilation_cache)
  assert_same_as_reference(workdir, reference_workdir)


def corrupt(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(b'\x00garbage' * (size // 8 + 1))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, reference_run, compilation_cache):
  reference_workdir, _ = reference_run
  workdir = tmp_path / 'corrupt'
  shutil.copytree(reference_workdir, workdir)
  checkpoints = workdir / 'checkpoints'
  steps = sorted(int(name) for name in os.listdir(checkpoints)
                 if name.isdigit())
  assert steps == [36, 39, 42]
  corrupt(checkpoints / '42')
  os.remove(workdir / 'export.npz')
  os.remove(workdir / 'launch.log')
  run_launch(workdir, compilation_cache)
  log = read_log(workdir, tail=None)
  assert 'Checkpoint at step 42 cannot be restored' in log
  assert 'Resuming from the checkpoint at step 39' in log
  assert_same_as_reference(workdir, reference_workdir)


@pytest.fixture(scope='module')
def learned_run(tmp_path_factory, compilation_cache):
  """The README's first try: configs/tiny.py as it is, TensorBoard included."""
  workdir = tmp_path_factory.mktemp('tiny')
  start = time.monotonic()
  results = run_launch(workdir, compilation_cache, fast=False)
  print(f'configs/tiny.py: {time.monotonic() - start:.1f} s, '
        f'test accuracy {results["test_accuracy"]}')
  return workdir, results


def test_tiny_config_learns(learned_run):
  workdir, results = learned_run
  assert results['test_accuracy'] >= 0.6  # 10 classes: chance is 0.1.
  assert results['evaluations'][0]['test_accuracy'] < results['test_accuracy']
  with open(workdir / 'results.json') as f:
    written = json.load(f)
  assert written['test_accuracy'] == results['test_accuracy']
  assert written['best_of_evaluations']['test_accuracy'] == max(
      e['test_accuracy'] for e in results['evaluations'])
  assert 'test set' in written['best_of_evaluations']['selected_on']
  metrics = read_metrics(workdir)
  train_lines = [m for m in metrics if 'loss' in m]
  assert [m['step'] for m in train_lines] == list(range(1, 101))
  assert train_lines[-1]['loss'] < train_lines[0]['loss'] - 1
  assert any(name.startswith('events.out.tfevents') for name in
             os.listdir(workdir))


def test_export_holds_only_the_task_parameters(learned_run):
  workdir, results = learned_run
  params, meta = export.load(workdir / 'export.npz')
  assert set(params) == {'synqt', 'head'}
  assert meta['config']['data']['task'] == 'eurosat'
  assert meta['config']['backbone_dtype'] == 'float32'  # predict holds it so.
  assert meta['test_accuracy'] == results['test_accuracy']
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert n == results['trainable_params']


def test_predict_classifies_image_files(learned_run, tmp_path,
                                        compilation_cache):
  """The export, moved away from the workdir, labels the test images."""
  workdir, results = learned_run
  moved = tmp_path / 'model.npz'
  shutil.copy(workdir / 'export.npz', moved)
  split = os.path.join(workdir, 'tiny_data', 'eurosat', 'test.txt')
  with open(split) as f:
    entries = [line.split() for line in f][:50]
  paths = [os.path.join(os.path.dirname(split), p) for p, _ in entries]
  labels = [int(label) for _, label in entries]
  predictor = predict.Predictor(str(moved))
  top = predictor.classify(paths, top_k=3)
  assert [path for path, _ in top] == paths
  assert all(len(labels_probs) == 3 for _, labels_probs in top)
  accuracy = np.mean([guesses[0][0] == label
                      for (_, guesses), label in zip(top, labels)])
  assert accuracy >= results['test_accuracy'] - 0.15

  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch.py'), 'predict',
       f'--workdir={workdir}', '--top_k=2', *paths[:2]],
      capture_output=True, text=True, timeout=240,
      env=launch_env(compilation_cache))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert [line.split('\t')[0] for line in lines] == paths[:2]
  for line, (_, guesses) in zip(lines, top):
    assert line.split('\t')[1].split()[0].startswith(f'{guesses[0][0]}:')
