"""Training checkpoints: checksums, shapes, keep_checkpoints, quiet fallback (issue 15)."""
import os
import shutil
import sys
import time
import types

import numpy as np
import pytest

from synqt_jax.training import checkpointing


def state(seed, size=8, leaves=40):
  rng = np.random.default_rng(seed)
  return {'params': {f'w{i}': rng.standard_normal(size).astype(np.float32)
                     for i in range(leaves)},
          'step': np.asarray(seed, np.int32)}


def saved(directory, states, keep=3):
  """TrainCheckpoints in `directory` holding {step: state}, all written."""
  checkpoints = checkpointing.TrainCheckpoints(str(directory), keep)
  for step, tree in states.items():
    checkpoints.save(step, tree, {'evaluations': [step]})
  checkpoints.wait_until_finished()
  checkpoints.close()


def restore(directory, target, keep=3):
  checkpoints = checkpointing.TrainCheckpoints(str(directory), keep)
  try:
    return checkpoints.restore_latest(target)
  finally:
    checkpoints.close()


def test_checkpoint_changed_at_the_same_size_falls_back_to_the_previous(
    tmp_path, caplog):
  """Defect 2: the arrays of step 2 replaced by others of the same size."""
  saved(tmp_path / 'run', {1: state(1), 2: state(2)})
  saved(tmp_path / 'other', {2: state(3)})
  shutil.rmtree(tmp_path / 'run' / '2' / 'state')
  shutil.copytree(tmp_path / 'other' / '2' / 'state',
                  tmp_path / 'run' / '2' / 'state')
  restored, metadata = restore(tmp_path / 'run', state(0))
  np.testing.assert_array_equal(restored['params']['w0'],
                                state(1)['params']['w0'])
  assert metadata == {'evaluations': [1]}  # The checksum is not handed out.
  assert 'Checkpoint at step 2 cannot be restored (its arrays do not match ' \
         'their checksum' in caplog.text
  assert sorted(os.listdir(tmp_path / 'run')) == ['1']


def test_intact_checkpoint_restores_bit_identical(tmp_path):
  saved(tmp_path, {5: state(5)})
  restored, _ = restore(tmp_path, state(0))
  for key, value in state(5)['params'].items():
    np.testing.assert_array_equal(restored['params'][key], value)
  assert int(restored['step']) == 5


def test_checkpoint_of_other_shapes_is_not_restored(tmp_path, caplog):
  """Defect 1: a resumed run whose config changed a shape."""
  saved(tmp_path, {4: state(4, size=8)})
  with pytest.raises(checkpointing.NoUsableCheckpointError,
                     match='was the config changed'):
    restore(tmp_path, state(0, size=16))
  assert 'Checkpoint at step 4 cannot be restored' in caplog.text
  assert os.listdir(tmp_path) == ['4']  # Nothing deleted.


def test_keep_checkpoints_is_respected_after_a_kill_after_the_last_save(
    tmp_path):
  """Defect 9: four checkpoints left (orbax's clean-up never ran), keep 3."""
  saved(tmp_path, {step: state(step) for step in (3, 6, 9, 12)}, keep=4)
  restored, _ = restore(tmp_path, state(0), keep=3)
  assert int(restored['step']) == 12
  assert sorted(int(name) for name in os.listdir(tmp_path)) == [6, 9, 12]


def test_fallback_from_a_truncated_checkpoint_is_quiet(tmp_path, monkeypatch):
  """Defect 7: ~100 'Event loop is closed' tracebacks on a good fallback."""
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  big = {'size': 4096, 'leaves': 150}
  saved(tmp_path, {1: state(1, **big), 2: state(2, **big)})
  data = os.path.join(tmp_path, '2', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), 10)
  restored, _ = restore(tmp_path, state(0, **big))
  assert int(restored['step']) == 1
  time.sleep(1)  # The other reads report after the restore has returned.
  assert [str(r.exc_value) for r in reported] == []


def test_only_closed_event_loop_reports_are_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpointing._ignore_reads_after_a_failed_restore()
  checkpointing._ignore_reads_after_a_failed_restore()  # Installed once.
  closed = types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'))
  other = types.SimpleNamespace(exc_value=RuntimeError('something else'))
  sys.unraisablehook(closed)
  sys.unraisablehook(other)
  assert seen == [other]


def test_state_digest_sees_every_bit_and_not_the_integer_width():
  a = state(1)
  b = state(1)
  b['params']['w7'] = b['params']['w7'].copy()
  b['params']['w7'].view(np.uint32)[3] ^= 1  # One bit of one float.
  assert checkpointing.state_digest(a) != checkpointing.state_digest(b)
  wide = dict(a, step=np.asarray(a['step'], np.int64))  # A fresh host state's step.
  assert checkpointing.state_digest(wide) == checkpointing.state_digest(a)
