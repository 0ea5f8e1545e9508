"""Host memory: each phase's share of a run's peak; arrays XLA:CPU takes in place.

A run's peak resident memory is one number (`/usr/bin/time -f %M`); the phases
say which part of the run reached it: loading the data and the backbone,
compiling the train step, building a feature cache, the first step, training,
evaluating. Each phase is logged as it ends and the run writes them all to
`<workdir>/host_memory.json`, which benchmarks/real_transfer.py prints.

On a CPU device, a host array that starts on a 64-byte boundary becomes the
device buffer itself; any other is copied (`aligned_empty`, `aligned`).
"""
import ctypes
import resource
import sys

from absl import logging
import numpy as np

GB = 1e9
FILE = 'host_memory.json'  # In the workdir.


def resident_bytes() -> int | None:
  """The resident set now (Linux's /proc/self/statm), or None elsewhere."""
  try:
    with open('/proc/self/statm') as f:
      pages = int(f.read().split()[1])
  except (OSError, IndexError, ValueError):
    return None
  return pages * resource.getpagesize()


def peak_bytes() -> int:
  """The peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024


class Phases:
  """`mark(name)` at the end of each phase; `records` for host_memory.json."""

  def __init__(self):
    self.records = []

  def mark(self, phase: str) -> None:
    now, peak = resident_bytes(), peak_bytes()
    peak = max(peak, now or 0)  # The kernel's peak lags the resident count a little.
    self.records.append({'phase': phase, 'resident_bytes': now, 'peak_bytes': peak})
    shown = 'unknown' if now is None else f'{now / GB:.2f} GB'
    logging.info('Host memory after %s: %s resident, %.2f GB peak so far.',
                 phase, shown, peak / GB)


def aligned_empty(shape, dtype, alignment=64):
  """An uninitialised array starting on a 64-byte boundary.

  XLA:CPU takes such an array as it is (NumPy's own start on 16 bytes): a
  batch of ViT-B/16 K/V (~0.9 GB) copied cost a quarter of a cached step, and a
  backbone copied is held twice.
  """
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  buffer = np.empty(size + alignment, np.uint8)
  start = -buffer.ctypes.data % alignment
  return buffer[start:start + size].view(dtype).reshape(shape)


def aligned(x: np.ndarray) -> np.ndarray:
  """`x` on a 64-byte boundary: itself if it is, else a copy."""
  x = np.asarray(x)
  if x.ctypes.data % 64 == 0 and x.flags.c_contiguous:
    return x
  out = aligned_empty(x.shape, x.dtype)
  out[...] = x
  return out


def return_freed() -> None:
  """Hands the heap that compiling freed back to the system (glibc's malloc_trim).

  XLA's compiler frees what it allocated, but glibc keeps it in the heap: after
  compiling a ViT-B/16 train step that is ~0.6 GB the process still counts.
  Elsewhere (no glibc) a no-op.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
