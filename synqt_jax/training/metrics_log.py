"""Training metrics to TensorBoard (tensorboardX) and to `metrics.jsonl` in the workdir.

One JSON object per line, keyed by `step` (optimizer updates done). A resumed
run first drops the lines past its checkpoint, so a run interrupted and resumed
writes the same lines as one that was not (up to timing fields).
`StepMetrics` holds each step's metrics on the device until they are written,
so training never waits on the host between steps. The event files are written
by tensorboardX, which needs no TensorFlow (clu's writers import it: ~0.7 GB
resident in the training process).
"""
import json
import os
import time

import jax
import tensorboardX
import tqdm

from synqt_jax.training import workdir as workdir_lib


class MetricsLog:
  """Writes on process 0 only; the other processes' calls do nothing."""

  def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True):
    self._enabled = jax.process_index() == 0
    self._path = workdir_lib.as_path(workdir) / 'metrics.jsonl'
    self._file = self._writer = None
    if not self._enabled:
      return
    self._truncate_after(resume_step)
    self._file = self._path.open('a')
    if tensorboard:  # Writes from its own thread, as clu's AsyncWriter.
      self._writer = tensorboardX.SummaryWriter(
          os.fspath(workdir_lib.as_path(workdir)))

  def _truncate_after(self, step: int) -> None:
    if not self._path.exists():
      return
    with self._path.open() as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        pass  # A line cut short by a kill.
    with self._path.open('w') as f:
      f.writelines(kept)

  def write(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    self._file.write(json.dumps({'step': step, **scalars}) + '\n')
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)

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


class StepMetrics:
  """The train steps' device metrics, held until `write` (no per-step sync).

  `write` fetches them with `fetch` (one device's copy as host arrays),
  writes one line per step with its epoch, adds the images per second since
  the last write to the last line, and moves the progress bar (`desc`; None:
  no bar, e.g. for all but one member of a sweep). Each step's scalars are
  handed to `check(step, scalars)` first (the trainer's guard against a
  diverged run: it raises before a non-finite line is written).
  """

  def __init__(self, log: MetricsLog, fetch, *, start_step: int,
               total_steps: int, steps_per_epoch: int, batch_size: int,
               check=lambda step, scalars: None,
               desc: str | None = 'Training'):
    self._log, self._fetch, self._check = log, fetch, check
    self._steps_per_epoch, self._batch_size = steps_per_epoch, batch_size
    self._pending = []  # (steps done, device metrics)
    self._window_start = time.perf_counter()
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                          disable=jax.process_index() != 0 or desc is None,
                          desc=desc)

  def add(self, step: int, device_metrics) -> None:
    """Holds the metrics of the step that made `step` updates."""
    self._pending.append((step, device_metrics))

  def write(self) -> None:
    """Writes the metrics of the steps added since the last call."""
    if not self._pending:
      return
    values = self._fetch([m for _, m in self._pending])
    images_per_sec = (len(self._pending) * self._batch_size /
                      (time.perf_counter() - self._window_start))
    last = self._pending[-1][0]
    for (step, _), step_metrics in zip(self._pending, values):
      scalars = {'epoch': step / self._steps_per_epoch,
                 **{k: float(v) for k, v in step_metrics.items()}}
      if step == last:
        scalars['images_per_sec'] = images_per_sec
      self._check(step, scalars)
      self._log.write(step, scalars)
    self._bar.set_postfix(loss=f'{scalars["loss"]:.4f}',
                          lr=f'{scalars["learning_rate"]:.2e}',
                          img_s=f'{images_per_sec:.0f}')
    self._bar.update(len(self._pending))
    self._pending, self._window_start = [], time.perf_counter()

  def close(self) -> None:
    self._bar.close()
