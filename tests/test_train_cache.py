"""The trainer with a frozen-feature cache and deferred evaluation (issue 6).

In-process tiny runs (one CPU device, LLVM -O0 via training_runs): cached
training follows the online trajectory when neither has image-path stochastic
depth, a disk cache survives preemption and is reused on resume, and deferred
evaluation reports exactly what evaluating at each point does.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import final_params
from training_runs import losses
from training_runs import read_metrics
from training_runs import read_results
from training_runs import reproducible
from training_runs import tiny_config

from synqt_jax import demo
from synqt_jax.config import validation as config_validation
from synqt_jax.models import methods
from synqt_jax.training import checkpointing
from synqt_jax.training import feature_cache
from synqt_jax.training import loop
from synqt_jax.training import train

# No stochastic depth anywhere, so the online image path matches the cache's;
# dropout and the head's drop path stay on (same keys on both paths).
NO_DROP_PATH = {'synqt.drop_path': 0.0}


def results(workdir):
  """results.json less the checkpoint path (which names the workdir)."""
  return {k: v for k, v in read_results(workdir).items() if k != 'checkpoint'}


def run(workdir, **overrides):
  return train.train_and_evaluate(
      tiny_config(**{**NO_DROP_PATH, **overrides}), str(workdir))


@pytest.fixture(scope='module')
def runs(tmp_path_factory, compilation_cache):
  """Workdirs of the online and the host-cached run, and the cache's provenance."""
  del compilation_cache
  online = tmp_path_factory.mktemp('online')
  run(online)
  host = tmp_path_factory.mktemp('host')
  run(host, **{'train.feature_cache': 'host'})
  return online, host


def test_host_cache_follows_the_online_trajectory(runs):
  online, host = runs
  assert len(losses(host)) == 42
  np.testing.assert_allclose(losses(host), losses(online), rtol=1e-5,
                             atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                       atol=1e-5),
               final_params(host), final_params(online))
  assert (read_results(host)['evaluations'] ==
          read_results(online)['evaluations'])
  assert not os.path.exists(host / 'feature_cache')  # In memory only.


def test_the_host_runs_at_most_one_step_ahead():
  """A queued step holds its batch (154 MB of cached K/V for DINOv2-S/14 at
  112 px): before the next batch is made, the step before the last is done."""
  slow = jax.jit(lambda x: jax.lax.fori_loop(
      0, 100, lambda i, y: jnp.tanh(y @ y), x))
  in_flight = loop.OneStepInFlight()
  first = slow(jnp.eye(512))
  in_flight.dispatched(first)
  second = slow(first)
  assert not first.is_ready()  # Dispatched asynchronously: still running.
  in_flight.dispatched(second)
  assert first.is_ready() and not second.is_ready()


def test_bfloat16_device_cache_follows_within_its_rounding(runs, tmp_path):
  """K/V rounded to 8 significant bits: 42 steps stay within 1e-2 of online."""
  online, _ = runs
  run(tmp_path, **{'train.feature_cache': 'device',
                   'train.cache_dtype': 'bfloat16'})
  assert len(losses(tmp_path)) == 42
  np.testing.assert_allclose(losses(tmp_path), losses(online), rtol=1e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                       atol=1e-2),
               final_params(tmp_path), final_params(online))
  assert not np.array_equal(losses(tmp_path), losses(online))  # Rounded.
  with open(tmp_path / 'feature_cache' / 'train.json') as f:
    assert json.load(f)['fields']['storage_dtype'] == 'bfloat16'


def test_deferred_evaluation_equals_evaluating_at_each_point(
    runs, tmp_path):
  online, _ = runs
  run(tmp_path, **{'train.deferred_eval': True})
  ours, want = results(tmp_path), results(online)
  assert [e['epoch'] for e in want['evaluations']] == [2, 4, 6]
  assert ours == want
  assert len(os.listdir(tmp_path / 'deferred_eval')) == 3
  np.testing.assert_array_equal(losses(tmp_path), losses(online))
  evaluation_lines = lambda w: sorted(
      (m for m in read_metrics(w) if 'test_accuracy' in m),
      key=lambda m: m['step'])
  assert evaluation_lines(tmp_path) == evaluation_lines(online)


class PreemptAt:
  """A `checkpointing.Preemption` stand-in that asks to stop once, at step `step`."""

  def __init__(self, step):
    self._left = step

  def __call__(self):
    outer = self

    class Preemption:
      def requested(self):
        outer._left -= 1
        return outer._left == 0

      def restore(self):
        pass

    return Preemption()


def test_disk_cache_is_reused_on_resume_and_ends_the_same(
    runs, tmp_path, monkeypatch):
  """Preempted at step 17 (a deferred point kept at 14), resumed to the end."""
  _, host = runs
  provenance = []
  build = feature_cache.build

  def recording_build(*args, **kwargs):
    cache = build(*args, **kwargs)
    provenance.append(cache.provenance)
    return cache

  monkeypatch.setattr(feature_cache, 'build', recording_build)
  overrides = {'train.feature_cache': 'disk', 'train.deferred_eval': True}
  with monkeypatch.context() as m:
    m.setattr(checkpointing, 'Preemption', PreemptAt(17))
    assert run(tmp_path, **overrides) is None
  assert not (tmp_path / 'results.json').exists()
  assert os.listdir(tmp_path / 'deferred_eval') == [
      'step_14.process_0.npz']
  with open(tmp_path / 'feature_cache' / 'train.json') as f:
    stored = json.load(f)['fingerprint']
  run(tmp_path, **overrides)
  assert provenance[0].startswith('building')
  assert provenance[1] == (
      f'reused {tmp_path / "feature_cache" / "train.kv.npy"} '
      f'(fingerprint {stored[:12]})')
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path),
               final_params(host))
  np.testing.assert_array_equal(losses(tmp_path), losses(host))
  assert results(tmp_path) == results(host)
  assert reproducible([m for m in read_metrics(tmp_path) if 'loss' in m]) == (
      reproducible([m for m in read_metrics(host) if 'loss' in m]))


@pytest.mark.parametrize('field,value', [
    ('train.feature_cache', 'gpu'),
    ('train.feature_cache', True),
    ('train.cache_dtype', 'float16'),
    ('train.deferred_eval', 'yes'),
    ('synqt.image_path_memory', 'checkpoint'),
])
def test_invalid_values_are_rejected_naming_the_field(field, value):
  config = tiny_config()
  section, name = field.split('.')
  with config.ignore_type():  # A value of another type, as from JSON.
    config[section][name] = value
  with pytest.raises(config_validation.ConfigError,
                     match=f'config.{field}='):
    config_validation.validate(config)


@pytest.mark.parametrize('field,value', [('train.feature_cache', 'host'),
                                         ('train.deferred_eval', True)])
def test_cache_and_deferred_eval_need_a_method_that_reads_them(field, value):
  config = tiny_config(**{'method': 'lora', field: value})
  with pytest.raises(config_validation.ConfigError,
                     match=f"config.{field}=.*'linear', 'synqt'"):
    config_validation.validate(config)


def test_linear_probe_from_its_feature_cache_trains_exactly_as_online(tmp_path):
  """Its pooled features have nothing stochastic: same losses, head and scores."""
  online, cached = tmp_path / 'online', tmp_path / 'cached'
  run(online, method='linear')
  run(cached, **{'method': 'linear', 'train.feature_cache': 'host',
                 'train.deferred_eval': True})
  assert len(losses(cached)) == 42
  np.testing.assert_allclose(losses(cached), losses(online), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               final_params(cached), final_params(online))
  assert (read_results(cached)['evaluations'] ==
          read_results(online)['evaluations'])
  assert read_results(cached)['test_accuracy'] == read_results(online)['test_accuracy']


def test_defaults_are_valid_and_image_path_memory_reaches_the_method(tmp_path):
  config = tiny_config(**{'synqt.image_path_memory': 'recompute',
                          'train.feature_cache': 'host'})
  config_validation.validate(config)
  config = train.resolve_workdir_paths(config, tmp_path)
  demo.prepare(config)
  method, _ = methods.create_method(config)
  assert method.config.image_path_memory == 'recompute'
  assert method.config.image_drop_path is False
  method, _ = methods.create_method(
      train.resolve_workdir_paths(tiny_config(), tmp_path))
  assert method.config.image_path_memory == 'keep_kv'
  assert method.config.image_drop_path is True
