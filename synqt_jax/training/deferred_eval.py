"""Scores many parameter sets against one backbone pass over an evaluation set.

Evaluating every N epochs costs a full backbone pass over the test set each
time. The backbone is frozen, so a test image's per-block K/V are the same at
every evaluation point: keep the trainable parameters of each point (they are
small) and score all of them at the end, computing each batch's K/V once and
running only the query path per parameter set. The counts are those of
separate evaluations (same batches, same mask, same sums); it works the same
after online and cached training.
"""
import dataclasses
import functools
from typing import Any, Sequence

import jax

from synqt_jax.data import batching
from synqt_jax.data import sources
from synqt_jax.training import devices
from synqt_jax.training import steps


@dataclasses.dataclass(frozen=True)
class Scores:
  """Correct predictions of each parameter set among `count` examples."""
  correct: tuple[int, ...]
  count: int

  @property
  def accuracies(self) -> tuple[float, ...]:
    return tuple(c / self.count for c in self.correct)


def evaluate(method, frozen, parameter_sets: Sequence[Any],
             source: sources.Source, global_batch: int, *,
             normalization: str, num_threads: int | None = None) -> Scores:
  """Scores every trainable tree in `parameter_sets` on all of `source`.

  Args:
    method: a `methods.SynQT`.
    frozen: the frozen parameters replicated over the local devices, as the
      trainer holds them (`devices.replicate`).
    parameter_sets: unreplicated trainable trees, e.g. one per evaluation
      epoch (host copies: `jax.device_get(unreplicate(state.params))`).
    source: the evaluation split; read once, in order.
    global_batch: examples per step over all hosts and devices.
    normalization: the data config's normalization.
    num_threads: threads that decode images (default: one per core).
  """
  return evaluate_each([(method, p) for p in parameter_sets], frozen, source,
                       global_batch, normalization=normalization,
                       num_threads=num_threads)


def evaluate_each(scored: Sequence[tuple[Any, Any]], frozen,
                  source: sources.Source, global_batch: int, *,
                  normalization: str, num_threads: int | None = None) -> Scores:
  """`evaluate` of (method, trainable tree) pairs: methods on one backbone.

  Each batch's K/V are computed once (by the first method: the image path
  holds no trainable value and no method setting), then every pair's query
  path scores them; e.g. a sweep's combinations of T and scales.
  """
  image_kv = _pmapped(scored[0][0])[0]
  replicated = [(_pmapped(m)[1], devices.replicate(p)) for m, p in scored]
  counts = []
  for batch in batching.eval_batches(source, global_batch,
                                     normalization=normalization,
                                     num_threads=num_threads):
    kv = image_kv(frozen, batch['image'])
    counts.append([score(params, frozen, kv, batch['label'], batch['mask'])
                   for score, params in replicated])
  counts = jax.device_get(counts)  # One transfer at the end: no sync per batch.
  correct = tuple(int(sum(step[i]['correct'][0] for step in counts))
                  for i in range(len(replicated)))
  return Scores(correct, int(sum(step[0]['count'][0] for step in counts)))


@functools.lru_cache(maxsize=None)
def _pmapped(method):
  """(image_kv, score) under pmap, compiled once per method."""

  def score(trainable, frozen, kv, label, mask):
    return steps.counts(method.apply_kv(trainable, frozen, kv), label, mask)

  return jax.pmap(method.image_kv), jax.pmap(score, axis_name=devices.AXIS)
