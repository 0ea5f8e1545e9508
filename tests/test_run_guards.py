"""The trainer's guards, through launch.py on the fast tiny config (issue 15).

Each case is a bad run that must stop with one `Error:` line and exit 1,
before it writes anything broken: a changed config on a finished or a
resumed workdir, a diverging run, a NaN backbone, a corrupt test image, two
runs on one workdir. They need train.py to call synqt_jax/training/workdir.py,
nonfinite.py and Source.check_images (see those modules).
"""
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from synqt_jax import demo
from synqt_jax.training import nonfinite
from synqt_jax.training import train
from training_runs import REPO
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import launch_command
from training_runs import launch_env
from training_runs import read_log
from training_runs import read_metrics
from training_runs import run_launch
from training_runs import start_launch
from training_runs import tiny_config


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, compilation_cache):
  workdir = tmp_path_factory.mktemp('finished')
  run_launch(workdir, compilation_cache)
  return workdir


def run_failing(workdir, cache, overrides=None):
  """launch.py on `workdir`; asserts one `Error:` line and exit 1, returns it."""
  out = subprocess.run(launch_command(workdir, overrides), cwd=REPO,
                       env=launch_env(cache), capture_output=True, text=True,
                       timeout=300)
  output = out.stdout + out.stderr
  assert out.returncode == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  lines = [line for line in output.splitlines() if line.startswith('Error:')]
  assert len(lines) == 1, output[-3000:]
  return lines[0]


def contents(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def test_changed_config_on_a_finished_workdir_rewrites_nothing(
    finished_run, tmp_path, compilation_cache):
  """Defect 1: the export was rewritten with T=4 metadata, 16-query params."""
  workdir = tmp_path / 'finished'
  shutil.copytree(finished_run, workdir)
  before = contents(workdir)
  line = run_failing(workdir, compilation_cache, {'synqt.token_nums': 8})
  assert 'holds a finished run (results.json) of another config' in line
  assert 'synqt.token_nums 4 -> 8' in line and 'use a new workdir' in line
  assert contents(workdir) == before


def test_changed_shape_on_resume_stops_before_anything_is_written(
    finished_run, tmp_path, compilation_cache):
  """Defect 1: a flax ScopeParamShapeError after 'Resuming from step 46'."""
  workdir = tmp_path / 'killed'
  shutil.copytree(finished_run, workdir)
  os.remove(workdir / 'results.json')  # As if killed before the end.
  os.remove(workdir / 'export.npz')
  before = contents(workdir)
  line = run_failing(workdir, compilation_cache, {'synqt.token_nums': 8})
  assert 'holds another run: synqt.token_nums 4 -> 8' in line
  assert 'Use a new workdir' in line
  assert contents(workdir) == before


def test_diverging_run_stops_and_writes_no_nan(tmp_path, compilation_cache):
  """Defect 3: --config.optim.lr=1e30 gave exit 0 and a NaN export."""
  workdir = tmp_path / 'diverged'
  line = run_failing(workdir, compilation_cache, {'optim.lr': 1e30})
  assert line.startswith('Error: Training diverged at step ')
  assert 'learning rate' in line and 'Lower optim.lr' in line
  assert not (workdir / 'export.npz').exists()
  assert not (workdir / 'results.json').exists()
  manager = ocp.CheckpointManager(workdir / 'checkpoints',
                                  item_names=('state', 'metadata'))
  for step in manager.all_steps():  # Every checkpoint kept is finite.
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
    assert nonfinite.nonfinite_leaves(state['params']) == [], step
  manager.close()


def prepared(workdir):
  """The tiny config's demo checkpoint and data, written into `workdir`."""
  config = train.resolve_workdir_paths(tiny_config(), workdir)
  demo.prepare(config)
  return config


def test_nan_backbone_is_refused_at_load(tmp_path, compilation_cache):
  """Defect 3: a backbone full of NaNs trained to a plausible results.json."""
  workdir = tmp_path / 'nan_backbone'
  prepared(workdir)
  backbone = workdir / 'tiny_vit.npz'  # configs/tiny.py's backbone.
  with np.load(backbone) as f:
    flat = dict(f)
  flat['embedding/kernel'] = np.full_like(flat['embedding/kernel'], np.nan)
  np.savez(backbone, **flat)
  line = run_failing(workdir, compilation_cache)
  assert 'has non-finite weights' in line and 'embedding' in line
  assert not (workdir / 'checkpoints').exists()


def test_corrupt_test_image_stops_the_run_before_training(
    tmp_path, compilation_cache):
  """Defect 4: it crashed after training, before that checkpoint was saved."""
  workdir = tmp_path / 'corrupt_test_image'
  config = prepared(workdir)
  image = os.path.join(config.data.root, 'eurosat', 'images', 'test',
                       '000005.png')
  with open(image, 'r+b') as f:
    f.truncate(60)
  line = run_failing(workdir, compilation_cache)
  assert f'Cannot decode image {image} (listed at ' in line
  assert 'test.txt:6' in line
  assert not (workdir / 'checkpoints').exists()
  assert not (workdir / 'metrics.jsonl').exists()


def test_second_run_on_a_workdir_in_use_is_refused(tmp_path,
                                                   compilation_cache):
  """Defect 8: two runs at once crashed each other or duplicated metrics."""
  workdir = tmp_path / 'shared'
  # Long enough to be training still while the second run starts and is refused.
  first = start_launch(workdir, compilation_cache, {'optim.epochs': 60})
  try:
    lock = workdir / 'run.process_0.lock'
    deadline = time.monotonic() + 120
    # Past compiling: from there a SIGTERM ends the run saved after its next
    # step, with metrics to check (before, it exits at once, cleanly).
    while not (lock.exists() and lock.read_text()
               and 'Compiled the train step' in read_log(workdir, tail=None)):
      assert first.poll() is None, read_log(workdir)
      assert time.monotonic() < deadline
      time.sleep(0.05)
    line = run_failing(workdir, compilation_cache)
    assert 'is in use by another run' in line
    assert f'pid {first.pid}' in line
  finally:
    if first.poll() is None:
      first.send_signal(signal.SIGTERM)
    assert first.wait(120) == 0, read_log(workdir)
  steps = [m['step'] for m in read_metrics(workdir) if 'loss' in m]
  assert len(steps) == len(set(steps))  # No duplicated rows.
