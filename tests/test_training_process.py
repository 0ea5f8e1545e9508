"""What a `launch.py` training process loads: no TensorFlow; compiled programs from JAX's persistent cache.

Two runs of configs/tiny.py on folder data with TensorBoard on, sharing one
fresh compilation cache: the first compiles and fills it, the second compiles
nothing. Each run also accounts for its resident memory phase by phase.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from synqt_jax.training import compilation_cache
from synqt_jax.training import host_memory
from training_runs import launch_command
from training_runs import launch_env
from training_runs import read_log
from training_runs import read_metrics

# Runs launch.py as __main__, then says whether TensorFlow was imported.
WITH_TENSORFLOW_CHECK = (
    'import runpy, sys\n'
    'sys.argv = sys.argv[1:]\n'
    'try:\n'
    '  runpy.run_path(sys.argv[0], run_name="__main__")\n'
    'finally:\n'
    '  print("tensorflow imported:", "tensorflow" in sys.modules)\n')
SHORT = {'optim.epochs': 2, 'eval_every_epochs': 2, 'tensorboard': True}


def launch(workdir, cache):
  os.makedirs(workdir)
  command = launch_command(workdir, SHORT,
                           extra_args=[f'--compilation_cache={cache}'])
  env = launch_env(cache)
  del env['JAX_COMPILATION_CACHE_DIR'], env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']
  with open(workdir / 'launch.log', 'wb') as log:
    process = subprocess.run(
        [sys.executable, '-c', WITH_TENSORFLOW_CHECK, *command[1:]],
        env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
  assert process.returncode == 0, read_log(workdir)
  return read_log(workdir, tail=None)


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
  cache = tmp_path_factory.mktemp('xla_cache')
  first, second = (tmp_path_factory.mktemp(name) / 'run'
                   for name in ('first', 'second'))
  return first, launch(first, cache), second, launch(second, cache)


def test_training_does_not_import_tensorflow(two_runs):
  _, first_log, _, second_log = two_runs
  assert 'tensorflow imported: False' in first_log
  assert 'tensorflow imported: False' in second_log


def test_tensorboard_events_hold_the_logged_losses(two_runs):
  workdir, *_ = two_runs
  losses = {m['step']: m['loss'] for m in read_metrics(workdir) if 'loss' in m}
  [events] = glob.glob(str(workdir / 'events.out.tfevents.*'))
  logged = {event.step: float(tensor_util.make_ndarray(value.tensor))
            for event in event_file_loader.EventFileLoader(events).Load()
            for value in event.summary.value if value.tag == 'loss'}
  assert sorted(logged) == sorted(losses) == list(range(1, 15))
  np.testing.assert_allclose([logged[s] for s in losses], list(losses.values()),
                             rtol=1e-6)


def test_second_run_compiles_nothing(two_runs):
  _, first_log, _, second_log = two_runs
  assert '; 0 loaded from the persistent compilation cache' in first_log
  assert 'XLA compiled 0 programs (0.0 s);' in second_log
  assert 'XLA compiled 0 programs' not in first_log


def test_cache_directory_flag_env_default_and_off(monkeypatch):
  monkeypatch.delenv(compilation_cache.DIR_VARIABLE, raising=False)
  monkeypatch.setenv('HOME', '/home/someone')
  assert (compilation_cache.directory(None)
          == '/home/someone/.cache/synqt_jax/xla')
  monkeypatch.setenv(compilation_cache.DIR_VARIABLE, '/env/cache')
  assert compilation_cache.directory(None) == '/env/cache'
  assert compilation_cache.directory('/flag/cache') == '/flag/cache'
  assert compilation_cache.directory('') is None


def test_host_memory_accounts_for_the_peak_phase_by_phase(two_runs):
  workdir, log, *_ = two_runs
  with open(workdir / host_memory.FILE) as f:
    phases = json.load(f)
  assert [p['phase'] for p in phases] == [
      'loading the data', 'loading the backbone', 'compiling the train step',
      'putting the state on the devices', 'running the first step', 'training',
      'evaluating']
  peaks = [p['peak_bytes'] for p in phases]
  assert peaks == sorted(peaks)  # A peak so far never falls.
  for p in phases:
    assert 50e6 < p['resident_bytes'] <= p['peak_bytes'] < 20e9
  assert f'Host memory after training: {phases[5]["resident_bytes"] / 1e9:.2f} GB' in log
