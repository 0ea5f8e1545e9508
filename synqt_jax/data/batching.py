"""A split's batches for training and evaluation, laid out per host and device.

The training stream is a function of (seed, step) alone: step k is batch
k % steps_per_epoch of epoch k // steps_per_epoch, whose example order is
np.random.default_rng([seed, epoch]).permutation(n). An epoch's last batch is
padded with mask=0 rows (PyTorch's drop_last=False), so `train_batches(...,
start_step=k)` resumes exactly and the step is the only state to checkpoint.
Every host yields its contiguous slice of the global batch, shaped
[local_devices, per_device, ...].
"""
import concurrent.futures
import dataclasses
import itertools
from typing import Any, Iterator

import jax
import numpy as np

from synqt_jax.config import fields as config_fields
from synqt_jax.data import augment
from synqt_jax.data import prefetcher
from synqt_jax.data import preprocess
from synqt_jax.data import sources

Batch = dict[str, np.ndarray]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Batches in one pass over `num_examples`, the last one padded."""
  return -(-num_examples // global_batch)


def train_indices(num_examples: int, global_batch: int, seed: int,
                  step: int) -> np.ndarray:
  """Example indices of global training batch `step`; -1 marks padding."""
  epoch, batch = divmod(step, steps_per_epoch(num_examples, global_batch))
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return _pad(order[batch * global_batch:(batch + 1) * global_batch],
              global_batch)


def eval_indices(num_examples: int, global_batch: int, step: int) -> np.ndarray:
  """Example indices of global eval batch `step`, in order; -1 is padding."""
  stop = min(num_examples, (step + 1) * global_batch)
  return _pad(np.arange(step * global_batch, stop), global_batch)


def _pad(indices: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([indices, np.full(size - len(indices), -1)])


def train_batches(source: sources.Source, global_batch: int, *, seed: int,
                  normalization: str = config_fields.DATA_DEFAULTS['normalization'],
                  start_step: int = 0,
                  num_steps: int | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  local_device_count: int | None = None,
                  prefetch: int = 2,
                  num_threads: int | None = None) -> Iterator[Batch]:
  """This host's training batches from global step `start_step` on.

  Args:
    source: the training split, best an in-memory one
      (`data_config.load_source(..., in_memory=True)`).
    global_batch: examples per step over all hosts and devices.
    seed: the order's seed (>= 0).
    normalization: 'imagenet' or 'inception'.
    start_step: first global step to yield; restarting here yields exactly
      what an uninterrupted stream yields from this step on.
    num_steps: how many batches to yield; None: forever.
    process_index, process_count, local_device_count: this host's place;
      default from jax.
    prefetch: batches prepared ahead in a background thread.
    num_threads: threads that decode examples (default: one per core).

  Returns:
    An iterator of {'image': float32 [D, b, S, S, 3], 'label': int32 [D, b],
    'mask': float32 [D, b]} with D local devices and b = global_batch /
    (process_count * D) examples per device; padding rows have mask 0.
  """
  if not (isinstance(seed, (int, np.integer)) and seed >= 0):
    raise ValueError(f'seed={seed!r}; expected an int >= 0.')
  steps = (itertools.count(start_step) if num_steps is None
           else range(start_step, start_step + num_steps))
  stream = ((train_indices(len(source), global_batch, seed, step),
             augment.training_view(source, seed, step)) for step in steps)
  return _batches(source, global_batch, stream, normalization, process_index,
                  process_count, local_device_count, prefetch, num_threads)


def eval_batches(source: sources.Source, global_batch: int, *,
                 normalization: str = config_fields.DATA_DEFAULTS['normalization'],
                 process_index: int | None = None,
                 process_count: int | None = None,
                 local_device_count: int | None = None,
                 prefetch: int = 2,
                 num_threads: int | None = None) -> Iterator[Batch]:
  """This host's batches of one in-order pass over `source`.

  Examples are decoded on the fly in background threads, so big test sets
  stream. The last batch is padded with mask=0 rows: summing over mask counts
  every example exactly once. Arguments and batches as for `train_batches`;
  there are steps_per_epoch(len(source), global_batch) of them.
  """
  stream = ((eval_indices(len(source), global_batch, step), source.__getitem__)
            for step in range(steps_per_epoch(len(source), global_batch)))
  return _batches(source, global_batch, stream, normalization, process_index,
                  process_count, local_device_count, prefetch, num_threads)


def _batches(source, global_batch, index_stream, normalization, process_index,
             process_count, local_device_count, prefetch, num_threads):
  """Checks the layout now, then assembles this host's batches lazily.

  `index_stream` yields (global batch indices, index -> example) per step.
  """
  layout = HostLayout.of(global_batch, process_index, process_count,
                         local_device_count)
  preprocess.check_normalization(normalization)
  if len(source) == 0:
    raise ValueError(f'{source.name} has no examples.')

  def host_batches():
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for indices, examples in index_stream:
        yield _host_batch(examples, source.image_size,
                          indices[layout.host_rows], layout, normalization,
                          pool)

  return prefetcher.prefetched(host_batches(), prefetch)


@dataclasses.dataclass(frozen=True)
class HostLayout:
  """This host's rows of a global batch, and their per-device shape."""
  host_rows: slice
  local_device_count: int

  @classmethod
  def of(cls, global_batch, process_index=None, process_count=None,
         local_device_count=None):
    """The layout of this host (defaults from jax), checked."""
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if local_device_count is None:
      local_device_count = jax.local_device_count()
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is not in '
                       f'0..{process_count - 1}.')
    if global_batch % (process_count * local_device_count):
      raise ValueError(
          f'Global batch {global_batch} does not split evenly over '
          f'{process_count} processes x {local_device_count} local devices; '
          f'use a multiple of {process_count * local_device_count}.')
    per_host = global_batch // process_count
    return cls(slice(process_index * per_host, (process_index + 1) * per_host),
               local_device_count)

  def per_device(self, arrays):
    """Host arrays (b, ...) as (devices, b / devices, ...)."""
    return {k: v.reshape((self.local_device_count, -1) + v.shape[1:])
            for k, v in arrays.items()}


def train_batch_spec(global_batch: int, image_size: int | None, *,
                     inputs: tuple[str, tuple[int, ...], Any] | None = None) -> Batch:
  """What each of `train_batches`' batches is, as jax.ShapeDtypeStruct leaves.

  So that the train step compiles before any data (or feature cache) exists.
  `inputs`: (name, per-example shape, dtype) in place of the float32 'image'
  (a feature cache's 'kv').
  """
  layout = HostLayout.of(global_batch)
  rows = layout.host_rows.stop - layout.host_rows.start
  per_device = (layout.local_device_count, rows // layout.local_device_count)
  name, shape, dtype = inputs or ('image', (image_size, image_size, 3), np.float32)
  return {name: jax.ShapeDtypeStruct(per_device + tuple(shape), dtype),
          'label': jax.ShapeDtypeStruct(per_device, np.int32),
          'mask': jax.ShapeDtypeStruct(per_device, np.float32)}


def _host_batch(examples, size, indices, layout, normalization, pool):
  """`examples`: index -> (uint8 [size, size, 3] image, label)."""
  images = np.zeros((len(indices), size, size, 3), np.uint8)
  labels = np.zeros(len(indices), np.int32)
  rows = np.flatnonzero(indices >= 0)
  for row, (image, label) in zip(rows, pool.map(examples, indices[rows])):
    images[row], labels[row] = image, label
  images = preprocess.normalize(images, normalization)
  return layout.per_device({'image': images, 'label': labels,
                            'mask': (indices >= 0).astype(np.float32)})

