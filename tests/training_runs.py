"""Tiny training runs for the trainer tests, in this process or as `launch.py` subprocesses.

Every run uses configs/tiny.py, shrunk by FAST_OVERRIDES. Subprocesses get
their own simulated CPU device count (XLA_FLAGS must be set before jax is
imported) and share a persistent compilation cache with this process, so each
program compiles once per test session.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from synqt_jax.weights import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLVM -O0 halves XLA's compile time on CPU, and compiling is most of what
# these tests do. Set before jax starts its backend (a user's XLA_FLAGS wins).
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

# 100 images in batches of 16: 7 steps an epoch, the last one 4 real + 12
# padding.
FAST_OVERRIDES = {
    'demo.train_examples': 100, 'demo.test_examples': 40,
    'optim.batch_size': 16, 'optim.epochs': 6, 'optim.warmup_epochs': 1,
    'eval_every_epochs': 2, 'eval_batch_size': 16,
    'checkpoint_every_steps': 3, 'train.log_every_steps': 1,
    'tensorboard': False,
}
NO_DROPOUT = {'synqt.dropout': 0.0, 'synqt.drop_path': 0.0,
              'synqt.head_drop_path': 0.0}
# Values a resumed run reproduces; the rest (images/s) are timings.
TIMING_KEYS = ('images_per_sec',)


@pytest.fixture(scope='session')
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache per test session, this process's included."""
  cache = str(tmp_path_factory.getbasetemp() / 'jax_cache')
  os.makedirs(cache, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  return cache


def tiny_config(**overrides):
  """configs/tiny.py with FAST_OVERRIDES and then `overrides` ('a.b': value)."""
  config = tiny.get_config()
  for name, value in {**FAST_OVERRIDES, **overrides}.items():
    *parents, field = name.split('.')
    section = config
    for parent in parents:
      section = section[parent]
    section[field] = value
  return config


def launch_command(workdir, overrides=None, extra_args=(), fast=True):
  overrides = {**(FAST_OVERRIDES if fast else {}), **(overrides or {})}
  flags = [f'--config.{name}={value}' for name, value in overrides.items()]
  return [sys.executable, os.path.join(REPO, 'launch.py'),
          '--config', os.path.join(REPO, 'configs', 'tiny.py'),
          '--workdir', str(workdir), *flags, *extra_args]


def launch_env(cache, devices=1):
  """`devices` simulated CPU devices, LLVM -O0."""
  return {**os.environ,
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} '
                       '--xla_backend_optimization_level=0',
          'JAX_PLATFORMS': 'cpu',
          'JAX_COMPILATION_CACHE_DIR': cache,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def start_launch(workdir, cache, overrides=None, devices=1, extra_args=(),
                 log_name='launch.log', fast=True):
  """A running `launch.py` training subprocess; output goes to a log file."""
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, log_name), 'ab')
  return subprocess.Popen(launch_command(workdir, overrides, extra_args, fast),
                          cwd=REPO, env=launch_env(cache, devices),
                          stdout=log, stderr=subprocess.STDOUT)


def run_launch(workdir, cache, overrides=None, devices=1, extra_args=(),
               timeout=240, fast=True):
  """Trains to the end in a subprocess; returns results.json."""
  process = start_launch(workdir, cache, overrides, devices, extra_args,
                         fast=fast)
  assert process.wait(timeout) == 0, read_log(workdir)
  return read_results(workdir)


def read_results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def read_log(workdir, name='launch.log', tail=5000):
  """The run's output (its last `tail` characters; None: all of it)."""
  with open(os.path.join(workdir, name), errors='replace') as f:
    text = f.read()
  return text if tail is None else text[-tail:]


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def read_metrics(workdir):
  """metrics.jsonl's complete lines (a killed run may leave half a line)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def reproducible(metrics):
  return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
          for m in metrics]


def losses(workdir):
  return np.array([m['loss'] for m in read_metrics(workdir) if 'loss' in m])


def final_params(workdir):
  params, _ = export.load(os.path.join(workdir, 'export.npz'))
  return params
