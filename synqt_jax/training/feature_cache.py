"""The image path's per-block K/V of a training split, computed once and read every epoch.

SynQT's image path holds no trainable value. With no augmentation (the VTAB-1k
recipe) and no stochastic depth on the image path, an image's per-block keys
and values are the same every epoch, so `build` computes them once (batched,
pmapped over the local devices, with a progress bar) and `FeatureCache.batches`
serves exactly the batches `batching.train_batches` would -- same order,
same padding and mask, same [local_devices, per_device, ...] layout -- with
'kv' (B, L, 2, N, H, D/H) in place of 'image'. A training step then runs only
the query path (`methods.SynQT.apply_kv`). The linear probe caches its pooled
features the same way (`baselines.LinearProbe`; 'kv' then holds (B, D)).

Where the K/V live (`mode`):
  'host': a numpy array in host RAM.
  'disk': a memory-mapped .npy file in `directory`, written batch by batch, so
    sets larger than RAM work (the OS pages rows in as batches read them).
  'device': accelerator memory, sharded over all devices: device d (pmap
    order) holds rows [d*s, (d+1)*s). A batch is gathered by a pmapped
    reduce-scatter: every device contributes the rows of the global batch it
    owns (zeros elsewhere) and `psum_scatter` hands each device exactly its
    slice of the batch, so no device ever holds more than its shard plus one
    batch.

With a `directory`, the cache is kept there and reused by later runs in any
mode while its fingerprint matches (see `fingerprint`, feature_cache_files.py);
a mismatch or an interrupted build rebuilds it and logs why.

Rows: row i < n holds example i; row n holds the K/V of the all-zero image that
`train_batches` puts in padding rows (mask 0). `train_indices` marks padding
with -1, and index -1 reads row n, so cached batches equal online ones row for
row, padding included.
"""
import abc
import dataclasses
import functools
import itertools
import math
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from synqt_jax.data import batching
from synqt_jax.data import prefetcher
from synqt_jax.data import sources
from synqt_jax.models import synqt
from synqt_jax.models import vit as models_vit
from synqt_jax.training import feature_cache_files
from synqt_jax.training import host_memory
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts

MODES = ('host', 'disk', 'device')
AXIS = 'feature_cache'  # The pmapped axis of building and gathering.
DEVICE_COPY_ROWS = 64  # Rows a device cache copies from host to device at a time.
BUILD_BYTES_PER_DEVICE = 1 << 27  # One build step's K/V per device (`build_batch_size`).


def backbone_digest(frozen) -> str:
  """Content digest of the frozen backbone as loaded (unreplicated), for `fingerprint`.

  The values, not the checkpoint file's path, size and mtime: one pass over the
  weights (about a second for ViT-B) buys a fingerprint that survives a moved
  or re-downloaded checkpoint, catches a file rewritten at the same size, and
  covers what loading changes (the position embedding resized to the data's
  image size).
  """
  return checkpoint.digest(layouts.flatten(jax.device_get(frozen['backbone'])))


def fingerprint(*, backbone_digest: str, vit, data_config, split: str
                ) -> dict[str, Any]:
  """What the cached values depend on, field by field (JSON values).

  `build` adds the storage dtype, the number of examples and the format
  version. Args: the `backbone_digest` of the frozen backbone, its ViTConfig,
  the data config (`data_config.default_data_config`) and the cached split.
  """
  fields = {'backbone_digest': backbone_digest, 'split': split}
  for name in ('source', 'task', 'root', 'image_size', 'normalization'):
    fields[f'data.{name}'] = getattr(data_config, name)
  for field in dataclasses.fields(vit):
    value = getattr(vit, field.name)
    is_json = isinstance(value, (str, int, float, bool, type(None)))
    if dataclasses.is_dataclass(value):  # A hybrid's ResNetConfig.
      value, is_json = dataclasses.asdict(value), True
    fields[f'vit.{field.name}'] = value if is_json else np.dtype(value).name
  return fields


def build(method, frozen, source: sources.Source, *, normalization: str,
          mode: str = 'host', storage_dtype: str = 'float32',
          batch_size: int = 64, directory: str | None = None,
          name: str = 'train', fingerprint: dict[str, Any] | None = None
          ) -> 'FeatureCache':
  """The K/V cache of `source`: reused from `directory` when it matches, else built.

  Args:
    method: a `methods.SynQT` or `baselines.LinearProbe` (its `image_kv`
      computes the rows).
    frozen: the frozen parameters replicated over the local devices, as the
      trainer holds them (`flax.jax_utils.replicate`).
    source: the training split, best in memory.
    normalization: the data config's normalization.
    mode: 'host', 'disk' or 'device' (module docstring).
    storage_dtype: 'float32' (bit-exact) or 'bfloat16' (half the memory).
    batch_size: images per build step, a multiple of the local device count;
      fewer where one step's rows would pass BUILD_BYTES_PER_DEVICE.
    directory: where the cache is kept and reused; required for 'disk'.
    name: file stem in `directory` (e.g. the split).
    fingerprint: `fingerprint(...)` of the inputs; required with `directory`.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; expected one of {MODES}.')
  if storage_dtype not in models_vit.DTYPES:
    raise ValueError(f'storage_dtype={storage_dtype!r}; expected one of '
                     f'{tuple(models_vit.DTYPES)}.')
  if mode == 'disk' and directory is None:
    raise ValueError("mode='disk' needs a directory for the cache file.")
  if directory is not None and fingerprint is None:
    raise ValueError('A cache kept in a directory needs a fingerprint.')
  shape = (len(source) + 1,) + method.cache_row_shape
  dtype = np.dtype(models_vit.DTYPES[storage_dtype])
  batch_size = build_batch_size(batch_size, math.prod(shape[1:]) * 4,  # As computed.
                                jax.local_device_count())
  fill = functools.partial(_write_rows, method, frozen, source, normalization,
                           batch_size)
  if directory is None:
    kv = np.empty(shape, dtype)
    labels = fill(kv)
    provenance = 'built in memory'
  else:
    record = dict(fingerprint, storage_dtype=storage_dtype,
                  num_examples=len(source),
                  format_version=feature_cache_files.FORMAT_VERSION)
    kv, labels, provenance = feature_cache_files.reused_or_built(
        feature_cache_files.Files(directory, name), record, shape, dtype, fill)
  logging.info('Feature cache of %s (%s, %s, %.2f GB): %s.', source.name, mode,
               storage_dtype, kv.nbytes / 1e9, provenance)
  if mode == 'device':
    return DeviceFeatureCache(kv, labels, provenance)
  if mode == 'host' and isinstance(kv, np.memmap):
    kv = np.array(kv)
  return HostFeatureCache(kv, labels, provenance)


def batch_spec(global_batch: int, row_shape: tuple[int, ...], storage_dtype: str):
  """`batching.train_batch_spec` of `FeatureCache.batches`: 'kv' for 'image'."""
  return batching.train_batch_spec(
      global_batch, image_size=None,
      inputs=('kv', row_shape, _as_bits(np.zeros((), models_vit.DTYPES[storage_dtype])).dtype))


def _as_bits(rows: np.ndarray) -> np.ndarray:
  """Host rows as a step reads them: bfloat16 as a view of its uint16 bits
  (`synqt.kv_bits`: else XLA:CPU makes a float32 copy of the whole batch)."""
  return rows.view(np.uint16) if rows.dtype == jnp.bfloat16 else rows


def build_batch_size(batch_size, row_bytes, devices):
  """`batch_size` or fewer, so that one build step's rows fit BUILD_BYTES_PER_DEVICE.

  A step's K/V exist about three times over while it runs (computed, laid out
  per image, and the previous step's awaiting their copy), on top of the cache
  itself: ViT-S/14 at 112 px makes 2.4 MB an image, so 256 images would add
  ~1.8 GB. A multiple of `devices`, at least one row per device.
  """
  per_device = max(1, min(batch_size // devices, BUILD_BYTES_PER_DEVICE // row_bytes))
  return per_device * devices


class FeatureCache(abc.ABC):
  """Labels and the batch order of a cache; subclasses say where the K/V are."""

  def __init__(self, labels: np.ndarray, provenance: str):
    self.labels = labels  # (n + 1,) int32; the padding row's label is 0.
    self.num_examples = len(labels) - 1
    self.provenance = provenance  # 'built ...', 'reused ...' or 'rebuilt: ...'.

  @property
  @abc.abstractmethod
  def nbytes(self) -> int:
    """Bytes of K/V held (over all local devices in 'device' mode)."""

  def batches(self, global_batch: int, *, seed: int, start_step: int = 0,
              num_steps: int | None = None, process_index: int | None = None,
              process_count: int | None = None,
              local_device_count: int | None = None,
              prefetch: int = 0) -> Iterator[dict[str, Any]]:
    """`batching.train_batches` of the cached split, with 'kv' for 'image'.

    Same arguments and batches: {'kv': [D, b, L, 2, N, H, D/H] in the storage
    dtype (bfloat16 as its uint16 bits, `synqt.kv_bits`), 'label': int32
    [D, b], 'mask': float32 [D, b]}, from global step `start_step` on. In
    'device' mode 'kv' is already on the devices, laid out for `jax.pmap`.
    bfloat16 is a storage format: `apply_kv`'s query path casts each block's
    K/V to the model's dtype as it reads them. A batch is batch x the cache's
    row bytes (154 MB for DINOv2-S/14 at 112 px, batch 64): by default
    (`prefetch` 0) each is gathered when asked, in the caller's thread while
    the step before runs, so with `train.run`'s one step in flight at most
    two exist.
    """
    layout = batching.HostLayout.of(global_batch, process_index,
                                    process_count, local_device_count)
    steps = (itertools.count(start_step) if num_steps is None
             else range(start_step, start_step + num_steps))
    last = None if num_steps is None else start_step + num_steps - 1

    def host_batches(cache):
      for step in steps:
        indices = batching.train_indices(cache.num_examples, global_batch,
                                         seed, step)
        rows = indices[layout.host_rows]
        batch = {'kv': cache._kv(indices, rows, layout),  # pylint: disable=protected-access
                 **layout.per_device({'label': cache.labels[rows],
                                      'mask': (rows >= 0).astype(np.float32)})}
        if step == last:
          # The last batch does not keep the cache alive: the run's final
          # evaluation needs the memory (1.2 GB for 2000 DINOv2-S/14 test images).
          del cache
        yield batch

    return prefetcher.prefetched(host_batches(self), prefetch)

  @abc.abstractmethod
  def _kv(self, indices, rows, layout):
    """This host's [D, b, ...] K/V of global batch `indices` (its `rows`)."""


class HostFeatureCache(FeatureCache):
  """Rows in host RAM or a memory-mapped file: (n + 1, L, 2, N, H, D/H)."""

  def __init__(self, kv: np.ndarray, labels: np.ndarray, provenance: str):
    super().__init__(labels, provenance)
    self.kv = kv

  @property
  def nbytes(self) -> int:
    return self.kv.nbytes

  def _kv(self, indices, rows, layout):
    kv = host_memory.aligned_empty((len(rows),) + self.kv.shape[1:], self.kv.dtype)
    # 'wrap' reads row -1 (padding) as row n, and copies straight into `kv`:
    # the default mode ('raise') buffers the whole batch first (2.3x slower).
    np.take(self.kv, rows, axis=0, out=kv, mode='wrap')
    return layout.per_device({'kv': _as_bits(kv)})['kv']


class DeviceFeatureCache(FeatureCache):
  """Rows sharded over every device of every host (module docstring).

  Each shard starts as zeros on its device and is filled `DEVICE_COPY_ROWS`
  rows at a time (updated in place), so the host never holds more than that
  many rows of it -- on one device, the shard is the whole cache.
  """

  def __init__(self, kv: np.ndarray, labels: np.ndarray, provenance: str):
    super().__init__(labels, provenance)
    devices = jax.local_devices()
    rows_per_device = -(-len(kv) // jax.device_count())
    first = jax.process_index() * len(devices)  # pmap's global device order.
    shards = []
    for j, device in enumerate(devices):
      start = (first + j) * rows_per_device
      shard = jnp.zeros((1, rows_per_device) + kv.shape[1:], kv.dtype, device=device)
      stop = min(start + rows_per_device, len(kv))
      for row in range(start, stop, DEVICE_COPY_ROWS):
        rows = np.asarray(kv[row:min(row + DEVICE_COPY_ROWS, stop)])
        shard = _write_shard_rows(shard, jax.device_put(rows, device), row - start)
      shards.append(shard)
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    self.shards = jax.make_array_from_single_device_arrays(
        (len(devices), rows_per_device) + kv.shape[1:],
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)),
        shards)
    self._gather = jax.pmap(
        functools.partial(_gather_rows, padding_row=self.num_examples),
        axis_name=AXIS, in_axes=(0, None))

  @property
  def nbytes(self) -> int:
    return self.shards.nbytes

  def _kv(self, indices, rows, layout):
    del rows, layout  # Each device receives its own slice of the global batch.
    return self._gather(self.shards, indices.astype(np.int32))


@functools.partial(jax.jit, donate_argnums=0)
def _write_shard_rows(shard, rows, start):
  """`shard` (1, S, ...) with `rows` (r, ...) written from row `start`, in place."""
  return jax.lax.dynamic_update_slice_in_dim(shard, rows[None], start, axis=1)


def _gather_rows(shard, indices, padding_row):
  """Under pmap: this device's slice of the global batch's rows.

  `indices` (B,) are global row numbers, -1 for padding (row `padding_row`).
  Each device takes the rows its shard holds, zeros for the rest, and the
  reduce-scatter sums over devices (one non-zero term per row: exact in any
  dtype) and keeps B / devices rows here.
  """
  rows_here = shard.shape[0]
  local = (jnp.where(indices < 0, padding_row, indices)
           - jax.lax.axis_index(AXIS) * rows_here)
  owned = (local >= 0) & (local < rows_here)
  rows = shard[jnp.clip(local, 0, rows_here - 1)]
  rows = jnp.where(owned.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, 0)
  return synqt.kv_bits(jax.lax.psum_scatter(rows, AXIS, scatter_dimension=0, tiled=True))


class _WithPaddingImage(sources.Source):
  """`source` plus one last example: the all-zero image, label 0 (padding)."""

  def __init__(self, source):
    super().__init__(source.name, source.num_classes, source.image_size)
    self._source = source

  def __len__(self):
    return len(self._source) + 1

  def __getitem__(self, index):
    if index == len(self._source):
      size = self.image_size
      return np.zeros((size, size, 3), np.uint8), 0
    return self._source[index]


def _write_rows(method, frozen, source, normalization, batch_size, out):
  """Fills `out` (n + 1 rows) with the K/V of `source` and the padding image.

  Returns the n + 1 labels. Batch k + 1 is dispatched before batch k is
  copied out, so the host copy overlaps the device's work.
  """
  examples = _WithPaddingImage(source)
  image_kv = _pmapped_image_kv(method, np.dtype(out.dtype).name)
  labels = np.zeros(len(examples), np.int32)
  batches = batching.eval_batches(
      examples, batch_size, normalization=normalization, process_index=0,
      process_count=1)
  with tqdm.tqdm(total=len(examples), unit='images',
                 desc=f'Caching K/V of {source.name}') as bar:

    def store(start, kv, label):
      stop = min(start + batch_size, len(examples))
      out[start:stop] = np.asarray(kv).reshape((-1,) + kv.shape[2:])[:stop - start]
      labels[start:stop] = label.reshape(-1)[:stop - start]
      bar.update(stop - start)

    pending = None
    for start, batch in zip(range(0, len(examples), batch_size), batches):
      kv = image_kv(frozen, batch['image'])
      if pending is not None:
        store(*pending)
      pending = (start, kv, batch['label'])
    store(*pending)
  return labels


@functools.lru_cache(maxsize=None)
def _pmapped_image_kv(method, dtype_name):
  return jax.pmap(lambda frozen, images: method.image_kv(frozen, images)
                  .astype(dtype_name), axis_name=AXIS)
