"""A feature cache kept in a directory, reused by later runs while its record matches.

The rows are a memory-mapped .npy file, so 'disk' mode serves sets larger
than RAM; the record (.json) holds the fingerprint and the files' checksums.
"""
import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import os

from absl import logging
import jax.numpy as jnp
import numpy as np
import tqdm

FORMAT_VERSION = 2  # 2: checksums of the rows and labels.
CHUNK_BYTES = 1 << 26  # Checksummed chunks of rows: ~64 MB each.


@dataclasses.dataclass(frozen=True)
class Files:
  """A disk cache: K/V rows (.kv.npy), labels (.labels.npy), record (.json)."""
  directory: str
  name: str

  def path(self, suffix):
    return os.path.join(self.directory, self.name + suffix)


def reused_or_built(files, record, shape, dtype, fill):
  """(kv memmap, labels, provenance): the cache in `files` if `record` matches.

  Otherwise (re)builds it: the record is removed first and written last, and
  the rows go to a '.partial' file renamed into place, so an interrupted build
  is never taken for a complete one. The record holds a sha256 of the labels
  and of every chunk of rows, checked on reuse: files changed or cut short
  since they were written are rebuilt.
  """
  digest = _sha256(record)
  reason, reused = _reusable(files, record, digest, shape, dtype)
  if reused is not None:
    return (*reused, f'reused {files.path(".kv.npy")} (fingerprint '
            f'{digest[:12]})')
  logging.info('Feature cache %s: %s.', files.path('.kv.npy'), reason)
  os.makedirs(files.directory, exist_ok=True)
  if os.path.exists(files.path('.json')):
    os.remove(files.path('.json'))
  partial = files.path('.kv.npy.partial')
  bits = np.lib.format.open_memmap(partial, mode='w+', shape=shape,
                                   dtype=_file_dtype(dtype))
  _allocate(partial)
  labels = fill(bits.view(dtype))
  bits.flush()
  checksums = {'labels_sha256': hashlib.sha256(labels).hexdigest(),
               'chunk_rows': _chunk_rows(bits),
               'chunk_sha256': _chunk_digests(bits, 'Checksumming')}
  del bits
  os.replace(partial, files.path('.kv.npy'))
  np.save(files.path('.labels.npy'), labels)
  with open(files.path('.json.partial'), 'w') as f:
    json.dump({'fingerprint': digest, 'fields': record, **checksums}, f,
              indent=1, sort_keys=True)
  os.replace(files.path('.json.partial'), files.path('.json'))
  kv = np.load(files.path('.kv.npy'), mmap_mode='r').view(dtype)
  return kv, labels, reason


def _allocate(path):
  """Reserves the file's blocks now, so a full disk is an OSError here.

  (Not a SIGBUS when the memory map first writes to a block the disk has no
  room for.)
  """
  with open(path, 'r+b') as f:
    try:
      os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
      if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # Unsupported here.
        raise


def _reusable(files, record, digest, shape, dtype):
  """(None, (kv memmap, labels)) for a complete, intact cache, else (why not, None)."""
  if not os.path.exists(files.path('.json')):
    if os.path.exists(files.path('.kv.npy.partial')):
      return 'building (the last build was interrupted)', None
    return 'building (no cache yet)', None
  with open(files.path('.json')) as f:
    stored = json.load(f)
  if stored['fingerprint'] != digest:
    old = stored['fields']
    changes = [f'{k} {old.get(k)!r} -> {record.get(k)!r}'
               for k in sorted(set(old) | set(record))
               if old.get(k) != record.get(k)]
    return 'rebuilding, the inputs changed: ' + '; '.join(changes), None
  try:
    bits = np.load(files.path('.kv.npy'), mmap_mode='r')
    labels = np.load(files.path('.labels.npy'))
  except (OSError, ValueError, EOFError) as e:
    return ('rebuilding, the cache files are unreadable or cut short '
            f'({type(e).__name__}: {e})'), None
  if bits.shape != shape:
    return f'rebuilding, the cache file holds {bits.shape}, not {shape}', None
  if hashlib.sha256(labels).hexdigest() != stored['labels_sha256']:
    return 'rebuilding, the labels file was changed after it was written', None
  bad = [i for i, (ours, written) in enumerate(zip(
      _chunk_digests(bits, 'Verifying'), stored['chunk_sha256']))
         if ours != written]
  if bad:
    return (f'rebuilding, {len(bad)} chunk(s) of rows were changed after '
            'they were written (checksum mismatch from row '
            f'{bad[0] * stored["chunk_rows"]} on)'), None
  return None, (bits.view(dtype), labels)


def _chunk_rows(rows: np.ndarray) -> int:
  """Rows per checksummed chunk: about CHUNK_BYTES each."""
  return max(1, CHUNK_BYTES // max(1, rows[0].nbytes))


def _chunk_digests(rows: np.ndarray, verb: str) -> list[str]:
  """sha256 of each chunk of `rows` (file dtype), hashed on several threads."""
  size = _chunk_rows(rows)
  starts = range(0, len(rows), size)

  def chunk_digest(start):
    return hashlib.sha256(
        np.ascontiguousarray(rows[start:start + size])).hexdigest()

  with concurrent.futures.ThreadPoolExecutor() as pool:
    return list(tqdm.tqdm(pool.map(chunk_digest, starts), total=len(starts),
                          desc=f'{verb} the feature cache', unit='chunks',
                          disable=rows.nbytes < 16 * CHUNK_BYTES))


def _sha256(record):
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _file_dtype(dtype):
  """What the .npy header can name: bfloat16 rows are stored as their uint16 bits."""
  return np.dtype(np.uint16) if dtype == jnp.bfloat16 else dtype
