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
"""
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Any, Iterator

from absl import logging

from synqt_jax import config_fields
from synqt_jax import errors

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


def check_directory(workdir: str) -> None:
  """Raises WorkdirError unless `workdir` is, or can be made, a writable directory.

  Call it first: a path that is a file, lies under a file, or is on a
  read-only disk gets one line saying so. Writes nothing (the probe file is
  unnamed and gone at once); the trainer creates the directory.
  """
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
  """
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
  text = os.read(fd, 4096).decode(errors='replace')
  try:
    return json.loads(text) if text.strip() else {}
  except json.JSONDecodeError:
    return {'unreadable lock file': text[:80]}


def _write_holder(fd: int) -> None:
  holder = {'host': socket.gethostname(), 'pid': os.getpid(),
            'since': datetime.datetime.now().isoformat(timespec='seconds')}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(holder).encode())
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
  path = os.path.join(workdir, IDENTITY_FILE)
  stored = {}
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  finished = os.path.exists(os.path.join(workdir, RESULTS_FILE))
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


def write_json(path: str, data) -> None:
  """Writes `data` to `path` atomically: a whole file or the previous one."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             suffix='.json.part')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(data, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
