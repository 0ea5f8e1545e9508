"""Training metrics to TensorBoard (clu) and to `metrics.jsonl` in the workdir.

One JSON object per line, keyed by `step` (optimizer updates done). A resumed
run first drops the lines past its checkpoint, so a run interrupted and resumed
writes the same lines as one that was not (up to timing fields).
"""
import json
import os

import jax


def metric_writers():
  """clu.metric_writers, imported only when used: it imports TensorFlow."""
  try:
    from clu import metric_writers as writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'TensorBoard event files need TensorFlow and TensorBoard ({e}): '
        '`pip install tensorflow-cpu tensorboard`, or set '
        '--config.tensorboard=False.') from e
  return writers


class MetricsLog:
  """Writes on process 0 only; the other processes' calls do nothing."""

  def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._file = self._writer = None
    if not self._enabled:
      return
    self._truncate_after(resume_step)
    self._file = open(self._path, 'a')
    if tensorboard:
      writers = metric_writers()
      self._writer = writers.AsyncWriter(writers.SummaryWriter(workdir))

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self._path):
      return
    with open(self._path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        pass  # A line cut short by a kill.
    with open(self._path, 'w') as f:
      f.writelines(kept)

  def write(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    self._file.write(json.dumps({'step': step, **scalars}) + '\n')
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._writer is not None:
      self._writer.close()
