"""Checkpoints of a training run (orbax), restored from the newest readable one.

A checkpoint holds the unreplicated train state (trainable parameters,
optimizer state, step, RNG) as `state` and a JSON `metadata` item (data
position, evaluations so far). It does not depend on the device count and never
holds the frozen backbone. Orbax writes into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoints
intact; a checkpoint damaged afterwards is skipped with a warning.
"""
from absl import logging
import jax
import orbax.checkpoint as ocp


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none can be restored."""


class TrainCheckpoints:
  """The `checkpoints/` directory of a workdir."""

  def __init__(self, directory: str, keep: int):
    self._manager = ocp.CheckpointManager(
        directory, item_names=('state', 'metadata'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))

  def save(self, step: int, state, metadata: dict) -> None:
    """Saves `state` (a host-side, unreplicated tree) in the background."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        metadata=ocp.args.JsonSave(metadata)), force=True)

  def restore_latest(self, target):
    """(state, metadata) of the newest checkpoint that restores, or None.

    Args:
      target: a tree with the structure, shapes and dtypes of the state.

    Raises:
      NoUsableCheckpointError: there are checkpoints, but none restores.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for i, step in enumerate(steps):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            metadata=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d cannot be restored (%s: %s); '
                        'trying the previous one.', step, type(e).__name__, e)
        continue
      for unreadable in steps[:i]:  # Training will save these steps again.
        logging.warning('Deleting the unreadable checkpoint at step %d.',
                        unreadable)
        self._manager.delete(unreadable)
      return restored.state, restored.metadata
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
