"""JAX's persistent compilation cache, on by default, and a count of what it saved.

A second run of the same config, or a resumed one, loads every program from
the cache instead of compiling it again (ViT-B/16's train step takes about a
minute to compile on a CPU). `CompileCount` says afterwards how many programs
XLA compiled and how many came from the cache, from jax.monitoring's events.
"""
import os
import threading

import jax

DEFAULT_DIR = '~/.cache/synqt_jax/xla'
# Environment variables a user (or the tests) set for JAX itself; they win.
DIR_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
MIN_TIME_VARIABLE = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'
# Every XLA compilation request, cached or not, and the cached ones.
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def directory(flag_value: str | None) -> str | None:
  """The cache directory: the flag's, else $JAX_COMPILATION_CACHE_DIR, else DEFAULT_DIR; '' is off."""
  if flag_value is None:
    flag_value = os.environ.get(DIR_VARIABLE, DEFAULT_DIR)
  return os.path.abspath(os.path.expanduser(flag_value)) if flag_value else None


def enable(path: str | None) -> None:
  """Caches every compiled program in `path` (None: no persistent cache).

  Call before anything is compiled. Programs that compile in under a second
  are cached too (JAX's default skips them), so a second run compiles nothing.
  """
  if path is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return
  jax.config.update('jax_compilation_cache_dir', path)
  if MIN_TIME_VARIABLE not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


class CompileCount:
  """Counts this process's XLA compilations from now on, and the cache's hits."""

  def __init__(self):
    self.requests = self.hits = 0
    self.seconds = 0.0  # Compiling, cache hits excluded.
    self._hit_pending = threading.local()
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event == _HIT_EVENT:
      self.hits += 1
      self._hit_pending.value = True

  def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event != _COMPILE_EVENT:
      return
    self.requests += 1
    if not getattr(self._hit_pending, 'value', False):
      self.seconds += seconds
    self._hit_pending.value = False

  @property
  def compiled(self) -> int:
    return self.requests - self.hits

  def summary(self, path: str | None) -> str:
    cache = (f'{self.hits} loaded from the persistent compilation cache '
             f'{path}' if path else 'no persistent compilation cache '
             '(--compilation_cache is empty)')
    return (f'XLA compiled {self.compiled} programs ({self.seconds:.1f} s); '
            f'{cache}.')
