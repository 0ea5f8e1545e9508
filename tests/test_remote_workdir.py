"""A gs:// workdir: the run writes through etils.epath and orbax, never locally.

The fake bucket: epath's gs:// (its fsspec backend; with TensorFlow installed
epath would use tf.io.gfile) goes to an fsspec filesystem serving a temporary
directory as the store (`gs://b/p` is `<store>/b/p`, listings as GCS's), and
orbax's TensorStore arrays go to TensorStore's `file` driver at the same
place instead of its `gcs` driver, whose HTTP endpoint is pointed at a closed
loopback port so that anything not redirected fails instead of going out.
orbax's two google-cloud-storage calls (hierarchical-namespace check, rmtree)
are answered as for a plain bucket. Not covered: real GCS semantics (object
rename as copy, eventual listing), tf.io.gfile, TensorBoard's writer.
"""
import importlib
import json
import os

from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations import dirfs
from fsspec.implementations import local
import jax
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest

from synqt_jax import predict
from synqt_jax.training import checkpointing
from synqt_jax.training import sweep
from synqt_jax.training import train
from synqt_jax.training import workdir as workdir_lib
from synqt_jax.weights import export
from training_runs import NO_DROPOUT
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import reproducible
from training_runs import tiny_config

fsspec_registry = importlib.import_module('fsspec.registry')  # fsspec.registry
# is the registry's read-only view; the module holds the dict.
WORKDIR = 'gs://fake-bucket/runs/tiny'
# 14 steps, checkpoints every 3; every kind of file a run writes.
SHORT = {'optim.epochs': 2, 'train.deferred_eval': True,
         'train.feature_cache': 'disk', **NO_DROPOUT}


class _BucketsInDirectory(dirfs.DirFileSystem):
  """gs://bucket/path as <root>/bucket/path; paths come back as gcsfs's."""
  protocol = ('gs', 'gcs')
  cachable = False
  root = None  # Set by the fixture.

  def __init__(self, **unused_gcsfs_options):
    super().__init__(path=self.root, fs=local.LocalFileSystem())

  def _join(self, path):
    if isinstance(path, str):
      return super()._join(path.removeprefix('gs://'))
    return super()._join([p.removeprefix('gs://') for p in path])


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The fake bucket store; the cwd and the user's cache are empty temp dirs."""
  store = tmp_path / 'store'
  store.mkdir()
  monkeypatch.setattr(_BucketsInDirectory, 'root', str(store))
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  for protocol in _BucketsInDirectory.protocol:
    monkeypatch.setitem(fsspec_registry._registry, protocol,  # pylint: disable=protected-access
                        _BucketsInDirectory)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  def file_kvstore(path):
    return {'driver': 'file',
            'path': os.path.join(store, str(path).removeprefix('gs://'))}

  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', file_kvstore)
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled',
                      lambda path: False)
  monkeypatch.setattr(gcs_utils, 'rmtree',
                      lambda path, missing_ok=False: path.rmtree(
                          missing_ok=missing_ok))
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', 'http://127.0.0.1:9')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  yield store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def _metrics(directory):
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    return reproducible([json.loads(line) for line in f])


def _preempt_at(monkeypatch, step):
  """SIGTERM as the trainer sees it, at `step` (one `requested` call a step)."""
  calls = iter(range(1, 10**6))
  monkeypatch.setattr(checkpointing.Preemption, 'requested',
                      lambda self: next(calls) >= step)


def test_gs_workdir_trains_resumes_and_exports_with_nothing_written_locally(
    fake_gcs, tmp_path, monkeypatch, compilation_cache):
  with monkeypatch.context() as m:
    _preempt_at(m, 5)
    assert train.train_and_evaluate(tiny_config(**SHORT), WORKDIR) is None
  remote = fake_gcs / 'fake-bucket' / 'runs' / 'tiny'
  assert sorted(os.listdir(remote / 'checkpoints')) == ['3', '5']
  results = train.train_and_evaluate(tiny_config(**SHORT), WORKDIR)

  assert os.listdir(tmp_path / 'cwd') == []  # No ./gs:/fake-bucket/...
  assert not any('gs:' in path for path in _files(tmp_path))
  written = _files(remote)
  for name in ('config.json', 'identity.json', 'metrics.jsonl', 'results.json',
               'export.npz'):
    assert name in written
  assert sorted(os.listdir(remote / 'checkpoints')) == ['12', '14', '9']  # keep 3
  assert [path for path in written if path.startswith('deferred_eval/')] == [
      'deferred_eval/step_14.process_0.npz']
  assert not [path for path in written if path.endswith('.lock')]
  # Only what the run needs as local files: the demo data, the memory-mapped
  # feature cache.
  local_dir = workdir_lib.local_directory(WORKDIR)
  assert local_dir.startswith(str(tmp_path / 'cache'))
  assert sorted(os.listdir(local_dir)) == [
      'feature_cache', 'tiny_data', 'tiny_vit.npz']

  # Bit-identical to an uninterrupted run in a local workdir.
  local_workdir = tmp_path / 'local'
  want = train.train_and_evaluate(tiny_config(**SHORT), str(local_workdir))
  del results['checkpoint'], want['checkpoint']  # Where the demo data is.
  assert results == want
  assert _metrics(remote) == _metrics(local_workdir)
  path = predict.export_path(workdir=WORKDIR)
  assert path == WORKDIR + '/export.npz'
  ours, meta = export.load(path)
  theirs, _ = export.load(local_workdir / 'export.npz')
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert meta['step'] == 14


def test_gs_sweep_writes_every_member_remotely_and_matches_a_local_one(
    fake_gcs, tmp_path, compilation_cache):
  """The sweep goes through the trainer's epath workdir layer: members,
  summary and plot in the bucket, the same results as in a local workdir."""
  config = tiny_config(**{'optim.epochs': 2, 'train.feature_cache': 'host',
                          **NO_DROPOUT})
  grid = {'synqt.attn_scale': (0.1, 1.0)}
  ours = sweep.run(config, 'gs://fake-bucket/runs/sweep', grid)
  want = sweep.run(config, str(tmp_path / 'local_sweep'), grid)
  assert ours == want
  remote = fake_gcs / 'fake-bucket' / 'runs' / 'sweep'
  for name in ('results.json', 'summary.txt', 'accuracy.png',
               'attn_scale=0.1/results.json', 'attn_scale=1.0/export.npz',
               'attn_scale=1.0/checkpoints'):
    assert (remote / name).exists(), name
  assert os.listdir(tmp_path / 'cwd') == []
  assert not any('gs:' in path for path in _files(tmp_path))


def test_remote_lock_names_its_holder_and_is_released(fake_gcs):
  lock = fake_gcs / 'fake-bucket' / 'runs' / 'tiny' / 'run.process_0.lock'
  workdir_lib.as_path(WORKDIR).mkdir(parents=True)  # As the trainer does.
  with workdir_lib.locked(WORKDIR):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f'in use by another run.*pid {os.getpid()}'):
      with workdir_lib.locked(WORKDIR):
        pass
  assert not lock.exists()


def test_remote_lock_of_a_gone_run_is_taken_over_and_another_hosts_is_not(
    fake_gcs, caplog):
  lock = fake_gcs / 'fake-bucket' / 'runs' / 'tiny' / 'run.process_0.lock'
  lock.parent.mkdir(parents=True)
  dead_pid = 2**22 + 1  # Above the kernel's pid_max default: never alive.
  lock.write_text(json.dumps({'host': workdir_lib.socket.gethostname(),
                              'pid': dead_pid}))
  with workdir_lib.locked(WORKDIR):
    pass
  assert 'Taking over the lock' in caplog.text
  lock.write_text(json.dumps({'host': 'another-host', 'pid': 1}))
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f'if it is gone, delete {WORKDIR}/run.process_0.lock'):
    with workdir_lib.locked(WORKDIR):
      pass


def test_unreachable_remote_workdir_is_one_line(fake_gcs, monkeypatch):
  def unreachable(self):
    raise RuntimeError('Could not resolve host: storage.example\n\tdetails')

  monkeypatch.setattr(type(workdir_lib.as_path(WORKDIR)), 'is_file',
                      unreachable)
  with pytest.raises(workdir_lib.WorkdirError) as error:
    workdir_lib.check_directory(WORKDIR)
  assert str(error.value) == (
      f'--workdir {WORKDIR} cannot be reached (Could not resolve host: '
      'storage.example). Check the URL, the network and the credentials '
      '(gcloud auth application-default login).')
