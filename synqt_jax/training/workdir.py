"""A workdir holds one run, used by one process at a time.

  check_directory(workdir)       a usable directory, or a UserError saying why not
  with locked(workdir): ...      no second run on it at once
  check_identity(workdir, config, backbone_digest=...)
                                 the same run as before, or a UserError naming
                                 what changed

A workdir's identity is its config (identity.json): a resumed run must be the
same run, or checkpoints of other shapes or meaning get restored and mixed
into its results. Fields that say where things are (LOCATION_FIELDS) are not
part of it; fields that only say how the run is carried out
(OPERATIONAL_FIELDS) may change on resume, but not once the run has finished
(results.json): a finished workdir is never rewritten by another config.

A workdir is a local directory or a URL (gs://bucket/run: on Cloud TPU a
bucket is the filesystem the hosts share); `as_path(workdir)` is the
`etils.epath.Path` every file of the run is reached through. What must be a
local file (the memory-mapped disk feature cache, the data a config's
`prepare` generates for `{workdir}`) goes to `local_directory(workdir)`.
"""
import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
import uuid
from typing import Any, Iterator

from absl import logging
from etils import epath

from synqt_jax import errors
from synqt_jax.config import fields as config_fields

IDENTITY_FILE = 'identity.json'
RESULTS_FILE = 'results.json'
# Where the backbone and the data are found: the backbone's digest and the
# task stand for what they are, so a moved workdir or data folder still
# resumes.
LOCATION_FIELDS = ('data.root', 'backbone.source', 'backbone.collection',
                   'backbone.cache_dir')
# How a run is carried out, not what it computes.
OPERATIONAL_FIELDS = ('eval_batch_size', 'checkpoint_every_steps',
                      'keep_checkpoints', 'tensorboard',
                      'train.log_every_steps', 'train.deferred_eval')


class WorkdirError(errors.UserError):
  """A workdir that cannot be used: not a directory, not writable, in use."""


class RunMismatchError(errors.UserError):
  """A workdir that holds another run than the config describes."""


def is_remote(workdir) -> bool:
  """True for a URL workdir (gs://...), False for a local directory."""
  return '://' in os.fspath(workdir)


def as_path(workdir) -> epath.Path:
  """`workdir` as a path: a local one made absolute, a URL as given."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir))


def local_directory(workdir) -> str:
  """A local directory for what this run needs as plain local files.

  The workdir itself when it is local; for a remote one a directory of the
  user's cache (XDG_CACHE_HOME or ~/.cache, then synqt_jax/remote_workdirs/)
  named by a digest of the URL, so a resumed run on this host finds it again.
  """
  if not is_remote(workdir):
    return os.path.abspath(workdir)
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  digest = hashlib.sha256(os.fspath(workdir).rstrip('/').encode()).hexdigest()
  return os.path.join(cache, 'synqt_jax', 'remote_workdirs', digest[:16])


def check_directory(workdir: str) -> None:
  """Raises WorkdirError unless `workdir` is, or can be made, a writable directory.

  Call it first: a path that is a file, lies under a file, or is on a
  read-only disk gets one line saying so. Writes nothing (the probe file is
  unnamed and gone at once); the trainer creates the directory. A remote
  workdir is only checked not to be a file: its writability shows at the
  first write.
  """
  if is_remote(workdir):
    try:
      is_file = as_path(workdir).is_file()
    except Exception as e:  # pylint: disable=broad-except
      # Each backend (tf.io.gfile, gcsfs, ...) raises its own kind.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise WorkdirError(
          f'--workdir {workdir} cannot be reached ({reason}). Check the URL, '
          'the network and the credentials (gcloud auth application-default '
          'login).') from e
    if is_file:
      raise WorkdirError(f'--workdir {workdir} is a file, not a directory. '
                         'Give a directory (it is created if missing).')
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory. Give '
                       'a directory (it is created if missing).')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f'--workdir {workdir} is under {existing}, which is a '
                       'file. Give a directory path.')
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir} cannot be written to '
                       f'({e.strerror}). Give a directory you can write to.'
                       ) from e


def _lock_path(workdir: str, process_index: int) -> str:
  return os.path.join(workdir, f'run.process_{process_index}.lock')


@contextlib.contextmanager
def locked(workdir: str, process_index: int = 0) -> Iterator[None]:
  """Holds `workdir` for one run: a second run on it raises WorkdirError.

  The lock is the kernel's (flock) on run.process_<i>.lock, so it goes with
  the process however that ends; the file also names the holder (host, pid,
  start time) for the message. A lock file left by a process that is gone is
  taken over with a warning. Each process of a multi-host run locks its own
  file.

  A remote workdir (gs://...) has no kernel locks: see `_object_locked`.
  """
  if is_remote(workdir):
    with _object_locked(workdir, process_index):
      yield
    return
  path = _lock_path(workdir, process_index)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    holder = _read_holder(fd)
    if not _try_lock(fd, holder):
      raise WorkdirError(
          f'{workdir} is in use by another run ({_describe(holder)}). Wait '
          'for it to finish or stop it, or give this run a new workdir.')
    if holder:
      logging.warning('Taking over the lock of %s from a run that is gone '
                      '(%s).', path, _describe(holder))
    _write_holder(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # Released cleanly: nothing to take over.
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


@contextlib.contextmanager
def _object_locked(workdir: str, process_index: int) -> Iterator[None]:
  """The lock of a remote workdir: a lock object naming its holder.

  Removed when the run ends. One left behind that names this host and a pid
  that is gone is taken over with a warning; one from another host cannot be
  checked, so the run refuses and names the object to delete if that run is
  gone. Unlike flock this cannot keep apart two runs that start at the same
  moment.
  """
  lock = as_path(_lock_path(workdir, process_index))
  if lock.exists():
    holder = _parse_holder(lock.read_text())
    if holder.get('host') != socket.gethostname() or _alive(holder.get('pid')):
      raise WorkdirError(
          f'{workdir} is in use by another run ({_describe(holder)}). Wait '
          f'for it to finish or stop it; if it is gone, delete {lock}. Or '
          'give this run a new workdir.')
    logging.warning('Taking over the lock of %s from a run that is gone '
                    '(%s).', lock, _describe(holder))
  lock.write_text(json.dumps(_holder()))
  try:
    yield
  finally:
    lock.unlink(missing_ok=True)


def _try_lock(fd: int, holder: dict[str, Any]) -> bool:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError as e:  # A filesystem without locks: judge by the pid.
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    return not holder or (holder.get('host') == socket.gethostname()
                          and not _alive(holder.get('pid')))


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True
  return True


def _read_holder(fd: int) -> dict[str, Any]:
  os.lseek(fd, 0, os.SEEK_SET)
  return _parse_holder(os.read(fd, 4096).decode(errors='replace'))


def _parse_holder(text: str) -> dict[str, Any]:
  try:
    return json.loads(text) if text.strip() else {}
  except json.JSONDecodeError:
    return {'unreadable lock file': text[:80]}


def _holder() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'since': datetime.datetime.now().isoformat(timespec='seconds')}


def _write_holder(fd: int) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(_holder()).encode())
  os.fsync(fd)


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return 'a process that left no record'
  return ', '.join(f'{key} {value}' for key, value in holder.items())


def identity(config, **derived) -> dict[str, Any]:
  """The workdir record of `config`: its fields flattened, plus `derived`.

  Args:
    config: the run's config (ConfigDict).
    **derived: values the config does not hold but the run depends on,
      e.g. backbone_digest (feature_cache.backbone_digest), num_classes.
  """
  fields = dict(_flatten(config_fields.without_aliases(config.to_dict())),
                **derived)
  fields = {key: value for key, value in fields.items()
            if key not in LOCATION_FIELDS}
  return json.loads(json.dumps(fields, default=str))  # As stored: JSON values.


def check_identity(workdir: str, config, **derived) -> None:
  """Raises RunMismatchError unless `workdir` is new or holds this run.

  Records the identity when the workdir is new, gains a derived value or
  changes an operational field, so call it twice: before anything is written (with the config alone), and
  once the backbone is loaded, with backbone_digest=... Fields present in
  only one of the two records (a field added by a newer version, a derived
  value not yet known) are not compared.
  """
  ours = identity(config, **derived)
  path = as_path(workdir) / IDENTITY_FILE
  stored = json.loads(path.read_text()) if path.exists() else {}
  finished = (as_path(workdir) / RESULTS_FILE).exists()
  changes = [f'{key} {_short(stored[key])} -> {_short(ours[key])}'
             for key in sorted(set(stored) & set(ours))
             if stored[key] != ours[key]
             and (finished or key not in OPERATIONAL_FIELDS)]
  if changes and finished:
    raise RunMismatchError(
        f'{workdir} holds a finished run ({RESULTS_FILE}) of another config: '
        f'{"; ".join(changes)}. Its results and export are kept as they are; '
        'use a new workdir for this config.')
  if changes:
    raise RunMismatchError(
        f'{workdir} holds another run: {"; ".join(changes)}. Use a new '
        'workdir for this config (or delete this one to start over).')
  recorded = {**stored, **ours}  # Operational fields: the latest values.
  if recorded != stored:
    write_json(path, recorded)


def _short(value, limit=40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _flatten(tree, prefix='') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def write_json(path, data) -> None:
  """Writes `data` to `path` atomically: a whole file or the previous one."""
  write_file(path, lambda f: json.dump(data, f, indent=2), 'w', '.json.part')


def write_file(path, write, mode: str, suffix: str) -> None:
  """Calls `write(file)` on a file opened in `mode`, then renames it to `path`.

  The file is beside `path` (named ...`suffix`), so `path` is always whole:
  the new file or the previous one. On a remote filesystem it is written in
  memory first (remote files need not seek, as np.savez may), then through
  epath (on GCS the rename is a copy, and an object only appears whole).
  """
  if is_remote(path):
    target = epath.Path(path)
    staged = target.parent / f'{target.name}.{uuid.uuid4().hex}{suffix}'
    buffer = io.BytesIO() if 'b' in mode else io.StringIO()
    write(buffer)
    try:
      with staged.open(mode) as f:
        f.write(buffer.getvalue())
      staged.replace(target)
    finally:
      staged.unlink(missing_ok=True)
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             suffix=suffix)
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a run's files are not.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
