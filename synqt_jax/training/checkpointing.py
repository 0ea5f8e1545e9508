"""Checkpoints of a training run (orbax), restored from the newest intact one;
when a run saves, and SIGTERM as a request to save and stop.

A checkpoint holds the unreplicated train state (trainable parameters,
optimizer state, step, RNG) as `state` and a JSON `metadata` item (data
position, evaluations so far, and a sha256 of the state's arrays). It does not
depend on the device count and never holds the frozen backbone. Orbax writes
into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact; a checkpoint damaged
afterwards (unreadable, cut short, or changed at the same size: its checksum
no longer matches) is skipped with a warning, and the previous one is used.
"""
import hashlib
import signal
import sys

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from synqt_jax import errors
from synqt_jax.training import devices
from synqt_jax.training import nonfinite
from synqt_jax.training import workdir as workdir_lib

CHECKSUM_KEY = 'state_sha256'  # In each checkpoint's metadata.


class NoUsableCheckpointError(errors.UserError, RuntimeError):
  """Checkpoints exist but none can be restored."""


def state_digest(state) -> str:
  """sha256 over the state's leaves: path, dtype, shape and bytes of each.

  Dtypes are JAX's canonical ones: a fresh host state's int64 step is the
  int32 the devices hold, saved and restored.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    leaf = np.asarray(leaf)
    leaf = np.ascontiguousarray(leaf, jax.dtypes.canonicalize_dtype(leaf.dtype))
    h.update(f'{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}'.encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


class TrainCheckpoints:
  """The `checkpoints/` directory of a workdir."""

  def __init__(self, directory: str, keep: int):
    self.directory = directory
    self._keep = keep
    self._manager = ocp.CheckpointManager(
        directory, item_names=('state', 'metadata'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))

  def save(self, step: int, state, metadata: dict) -> None:
    """Saves `state` (a host-side, unreplicated tree) in the background."""
    metadata = dict(metadata, **{CHECKSUM_KEY: state_digest(state)})
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        metadata=ocp.args.JsonSave(metadata)), force=True)

  def latest_step(self) -> int | None:
    """The step of the newest checkpoint saved (None: none yet)."""
    return self._manager.latest_step()

  def restore_latest(self, target, at_most=None):
    """(state, metadata) of the newest checkpoint that restores intact, or None.

    Newer checkpoints that do not are deleted (training saves those steps
    again), and so are the oldest beyond `keep` (left by a run killed between
    a save and orbax's clean-up).

    Args:
      target: a tree with the structure, shapes and dtypes of the state.
      at_most: if given, the checkpoints after this step are deleted first
        (training will save them again), e.g. to restore every member of a
        sweep at the same step.

    Raises:
      NoUsableCheckpointError: there are checkpoints, but none restores.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if at_most is not None:
      for later in [s for s in steps if s > at_most]:
        logging.info('Deleting the checkpoint at step %d (after step %d).',
                     later, at_most)
        self._manager.delete(later)
      steps = [s for s in steps if s <= at_most]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    # Before the first attempt: a failed read's siblings can report while the
    # exception is still on its way here.
    _ignore_reads_after_a_failed_restore()
    for i, step in enumerate(steps):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            metadata=ocp.args.JsonRestore()))
        problem = _problem(restored.state, restored.metadata, abstract)
      except Exception as e:  # pylint: disable=broad-except
        problem = f'{type(e).__name__}: {e}'
      if problem is not None:
        logging.warning('Checkpoint at step %d cannot be restored (%s); '
                        'trying the previous one.', step, problem)
        continue
      for unreadable in steps[:i]:  # Training will save these steps again.
        logging.warning('Deleting the unreadable checkpoint at step %d.',
                        unreadable)
        self._manager.delete(unreadable)
      for old in steps[i + self._keep:]:
        self._manager.delete(old)
      metadata = dict(restored.metadata)
      metadata.pop(CHECKSUM_KEY, None)
      return restored.state, metadata
    if steps:
      raise NoUsableCheckpointError(
          f'None of the checkpoints at steps {steps} in '
          f'{self._manager.directory} can be restored (see the warnings '
          'above); was the config changed? Use a new workdir, or delete that '
          'directory to train from scratch.')
    return None

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _problem(state, metadata, abstract) -> str | None:
  """Why a restored checkpoint is not the state it claims to be (None: it is)."""
  if _layout(state) != _layout(abstract):
    return 'its arrays have other shapes than this config\'s'
  written = metadata.get(CHECKSUM_KEY)
  if written is not None and state_digest(state) != written:
    return ('its arrays do not match their checksum: the files were changed '
            'after they were written')
  return None


def _layout(tree):
  return [(jax.tree_util.keystr(path), tuple(x.shape), np.dtype(x.dtype))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _ignore_reads_after_a_failed_restore():
  """Silences TensorStore's late reports of a failed restore's other reads.

  When one read fails, orbax closes its event loop while TensorStore's other
  reads are still in flight; each then reports `RuntimeError: Event loop is
  closed` as an unraisable exception (a traceback apiece, over a hundred for
  one checkpoint). Those, and only those, are dropped from then on.
  """
  if getattr(sys.unraisablehook, 'ignores_closed_event_loop', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  hook.ignores_closed_event_loop = True
  sys.unraisablehook = hook


class Preemption:
  """SIGTERM sets a flag; the loop saves at the next step and exits cleanly.

  One per run (a sweep's members share it): caught from construction until
  `restore`.
  """

  def __init__(self):
    self._requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self) -> bool:
    """True on every host as soon as any host got SIGTERM (one allgather)."""
    if jax.process_count() == 1:
      return self._requested
    return bool(multihost_utils.process_allgather(
        np.int32(self._requested)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Checkpointing:
  """One member's checkpoints: restored, and saved with nothing non-finite.

  A context manager: on exit the saves in flight are finished.
  """

  def __init__(self, config, workdir, schedule):
    self._schedule = schedule
    self._checkpoints = TrainCheckpoints(
        workdir_lib.as_path(workdir) / 'checkpoints', config.keep_checkpoints)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._checkpoints.wait_until_finished()
    self._checkpoints.close()

  def restore(self, state, at_most=None):
    """(state, history): the newest checkpoint's (at step <= `at_most` if
    given), or `state` and no history."""
    restored = self._checkpoints.restore_latest(state, at_most)
    if restored is None:
      return state, {}
    state, metadata = restored
    logging.info('Resuming from the checkpoint at step %d.', int(state.step))
    return state, metadata

  def check_finite(self, step, scalars=None, params=None):
    """Stops the run (nonfinite.DivergedError) at a non-finite loss or parameter."""
    nonfinite.check_step(
        step, float(self._schedule(step - 1)), self._checkpoints.latest_step(),
        self._checkpoints.directory, params=params,
        loss=(scalars or {}).get('loss'))

  def save(self, step, p_state, history):
    state = devices.unreplicate(p_state)
    self.check_finite(step, params=state.params)
    self._checkpoints.save(step, state, {'data_position': step, **history})
