"""The workdir: a usable directory, one run at a time, the same run on resume (issue 15)."""
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from synqt_jax.training import workdir
from training_runs import tiny_config


def test_workdir_that_is_a_file_or_under_a_file_is_refused(tmp_path):
  """Defect 7: FileExistsError / NotADirectoryError tracebacks before."""
  (tmp_path / 'file').write_text('x')
  with pytest.raises(workdir.WorkdirError, match='is a file, not a directory'):
    workdir.check_directory(str(tmp_path / 'file'))
  with pytest.raises(workdir.WorkdirError, match='which is a file'):
    workdir.check_directory(str(tmp_path / 'file' / 'a' / 'b'))
  workdir.check_directory(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path) == ['file']  # Nothing written.


def test_read_only_workdir_is_refused(tmp_path, monkeypatch):
  """Defect 7: a read-only disk (simulated: tests run as root)."""
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(tempfile, 'TemporaryFile', read_only)
  with pytest.raises(workdir.WorkdirError,
                     match=r'cannot be written to \(Read-only file system\)'):
    workdir.check_directory(str(tmp_path))


HOLD_LOCK = """
import sys, time
from synqt_jax.training import workdir
with workdir.locked(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(60)
"""


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
  """Defect 8: two runs on one workdir at once."""
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir.WorkdirError) as info:
      with workdir.locked(str(tmp_path)):
        pass
    message = str(info.value)
    assert f'pid {holder.pid}' in message
    assert f'host {socket.gethostname()}' in message
    assert 'give this run a new workdir' in message
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone (SIGKILL): its lock is taken over, with a warning.
  with workdir.locked(str(tmp_path)):
    with open(tmp_path / 'run.process_0.lock') as f:
      assert json.load(f)['pid'] == os.getpid()
  assert (tmp_path / 'run.process_0.lock').read_text() == ''  # Released.


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  (tmp_path / 'run.process_0.lock').write_text(json.dumps(
      {'host': 'gone-host', 'pid': 123456789, 'since': '2026-01-01T00:00:00'}))
  with workdir.locked(str(tmp_path)):
    pass
  assert 'Taking over the lock' in caplog.text
  assert 'pid 123456789' in caplog.text


def test_lock_is_per_process_of_a_multihost_run(tmp_path):
  with workdir.locked(str(tmp_path), process_index=0):
    with workdir.locked(str(tmp_path), process_index=1):
      pass
    with pytest.raises(workdir.WorkdirError):
      with workdir.locked(str(tmp_path), process_index=0):
        pass


def test_changed_shape_on_resume_is_refused_before_anything_is_written(
    tmp_path):
  """Defect 1: a resumed run of another shape."""
  config = tiny_config()
  workdir.check_identity(str(tmp_path), config)
  workdir.check_identity(str(tmp_path), config, backbone_digest='abc')
  recorded = (tmp_path / 'identity.json').read_text()
  changed = tiny_config(**{'synqt.token_nums': 8, 'data.image_size': 64})
  with pytest.raises(workdir.RunMismatchError) as info:
    workdir.check_identity(str(tmp_path), changed)
  assert str(info.value) == (
      f'{tmp_path} holds another run: data.image_size 32 -> 64; '
      'synqt.token_nums 4 -> 8. Use a new workdir for this config (or delete '
      'this one to start over).')
  with pytest.raises(workdir.RunMismatchError, match='backbone_digest'):
    workdir.check_identity(str(tmp_path), config, backbone_digest='other')
  assert (tmp_path / 'identity.json').read_text() == recorded
  assert sorted(os.listdir(tmp_path)) == ['identity.json']


def test_operational_fields_may_change_until_the_run_has_finished(tmp_path):
  config = tiny_config()
  workdir.check_identity(str(tmp_path), config)
  faster = tiny_config(**{'eval_batch_size': 8, 'keep_checkpoints': 5,
                          'data.root': '/elsewhere'})
  workdir.check_identity(str(tmp_path), faster)  # A resume: allowed.
  (tmp_path / 'results.json').write_text('{}')
  workdir.check_identity(str(tmp_path), faster)  # The same finished run.
  with pytest.raises(workdir.RunMismatchError) as info:
    workdir.check_identity(str(tmp_path), config)
  assert 'holds a finished run (results.json) of another config' in str(
      info.value)
  assert 'eval_batch_size 8 -> 16' in str(info.value)


def test_finished_run_is_not_rewritten_by_a_changed_config(tmp_path):
  """Defect 1: a finished workdir rerun with --config.synqt.token_nums=4."""
  workdir.check_identity(str(tmp_path), tiny_config(),
                         backbone_digest='abc')
  (tmp_path / 'results.json').write_text('{"test_accuracy": 0.9}')
  before = {name: (tmp_path / name).read_bytes()
            for name in os.listdir(tmp_path)}
  with pytest.raises(workdir.RunMismatchError, match='synqt.token_nums 4 -> 8'):
    workdir.check_identity(str(tmp_path),
                           tiny_config(**{'synqt.token_nums': 8}))
  assert {name: (tmp_path / name).read_bytes()
          for name in os.listdir(tmp_path)} == before


def test_write_json_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / 'results.json'
  workdir.write_json(str(path), {'a': 1})

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(json, 'dump', killed)
  with pytest.raises(KeyboardInterrupt):
    workdir.write_json(str(path), {'a': 2})
  assert json.loads(path.read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['results.json']
