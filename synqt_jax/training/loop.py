"""The training loop every run goes through: one member, or a sweep's stack.

A member is one run of its own (its config, workdir, optimizer, state,
checkpoints, metrics and evaluator). `train_together` trains members that
run the same program on one batch stream with one compiled step
(`steps.train_steps`): a single run is one member (train.py), a sweep's
stack of combinations several (sweep.py). Each step asks `cadence` whether
it is time to log, evaluate or save, and the preemption flag once for all
members; members save together, so a run killed anywhere resumes exactly.

What the members share, `Inputs`, is placed when first needed: the step
compiles on the host trees' shapes first, then the frozen backbone goes to
the devices and the feature cache (if any) is built, once for every stack.
"""
import contextlib
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from synqt_jax.data import batching
from synqt_jax.training import cadence
from synqt_jax.training import checkpointing
from synqt_jax.training import devices
from synqt_jax.training import evaluators
from synqt_jax.training import feature_cache
from synqt_jax.training import host_memory
from synqt_jax.training import metrics_log
from synqt_jax.training import steps
from synqt_jax.training import workdir as workdir_lib


@dataclasses.dataclass
class Member:
  """One run trained in a loop: its directory, config, optimizer and state."""
  name: str
  workdir: str
  config: ml_collections.ConfigDict
  schedule: Any
  state: Any  # Host `state.TrainState`: initial, restored, then final.
  evaluator: evaluators.Evaluator | None = None


class Inputs:
  """What a run's members read: data, frozen backbone, feature cache.

  The host copy of the frozen tree is given up once it is on the devices
  (`p_frozen`); the cache (`config.train.feature_cache`) is built at its
  first use and kept until `release_cache`.
  """

  def __init__(self, config, workdir, method, frozen, data, backbone_digest):
    self.config, self.workdir, self.data = config, workdir, data
    self.method = method  # Computes the cache's rows.
    self.backbone_digest = backbone_digest
    self._frozen, self._p_frozen = frozen, None
    self._cache = None

  @property
  def host_frozen(self):
    """The frozen tree on the host, until it is placed (`p_frozen`)."""
    assert self._p_frozen is None, 'The frozen tree is on the devices.'
    return self._frozen

  def drop_frozen(self, keys) -> None:
    """Leaves out the parts of the frozen tree that the state holds instead
    (full fine-tuning's backbone is trainable): the devices hold them once."""
    self._frozen = {k: v for k, v in self.host_frozen.items() if k not in keys}

  @property
  def frozen_spec(self):
    """One device's frozen tree as `jax.ShapeDtypeStruct`s, placed or not."""
    if self._p_frozen is None:
      return jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
          self._frozen)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                        self._p_frozen)

  @property
  def p_frozen(self):
    """The frozen tree on every local device."""
    if self._p_frozen is None:
      self._p_frozen, self._frozen = devices.replicate(self._frozen), None
    return self._p_frozen

  @property
  def cached(self) -> bool:
    return self.config.train.feature_cache != 'none'

  def batch_spec(self):
    """One device's training batch, as `jax.ShapeDtypeStruct`s."""
    config = self.config
    if not self.cached:
      return batching.train_batch_spec(config.optim.batch_size,
                                       self.data.train.image_size)
    return feature_cache.batch_spec(config.optim.batch_size,
                                    self.method.cache_row_shape,
                                    config.train.cache_dtype)

  def train_batches(self, config, start_step):
    """`config`'s training batches from `start_step` on: online, or cached."""
    num_steps = self.data.total_steps - start_step
    if not self.cached:
      return batching.train_batches(
          self.data.train, config.optim.batch_size, seed=config.seed,
          normalization=config.data.normalization, start_step=start_step,
          num_steps=num_steps)
    if self._cache is None:
      self._cache = open_feature_cache(self.config, self.workdir, self.method,
                                       self.p_frozen, self.data,
                                       self.backbone_digest)
    return self._cache.batches(config.optim.batch_size, seed=config.seed,
                               start_step=start_step, num_steps=num_steps)

  def release_cache(self) -> None:
    """Lets go of the feature cache (the evaluation does not read it)."""
    self._cache = None


def open_feature_cache(config, workdir, method, p_frozen, data,
                       backbone_digest):
  """The training split's K/V cache, in host RAM only or kept in the workdir.

  'host': built in memory, nothing written; 'disk', 'device': built or reused
  in <workdir>/feature_cache/ (a local directory for a remote workdir:
  workdir.local_directory).
  """
  logging.info("Feature cache '%s' (%s): %s.", config.train.feature_cache,
               config.train.cache_dtype, method.cache_note)
  kept = config.train.feature_cache != 'host'
  cache = feature_cache.build(
      method, p_frozen, data.train, normalization=config.data.normalization,
      mode=config.train.feature_cache, storage_dtype=config.train.cache_dtype,
      batch_size=config.eval_batch_size,
      directory=(os.path.join(workdir_lib.local_directory(workdir),
                              'feature_cache') if kept else None),
      name='train', fingerprint=feature_cache.fingerprint(
          backbone_digest=backbone_digest, vit=method.vit,
          data_config=config.data, split=config.data.train_split)
      if kept else None)
  logging.info('Feature cache: %s.', cache.provenance)
  return cache


class OneStepInFlight:
  """Lets the host run one train step ahead of the devices, and no further.

  The next batch is made while a step runs; a step queued further ahead
  would hold its batch too (154 MB of cached K/V for DINOv2-S/14 at 112 px).
  """

  def __init__(self):
    self._running = None  # The outputs of the step dispatched before.

  def dispatched(self, outputs) -> None:
    """Called after each step's dispatch: waits for the step before it."""
    jax.block_until_ready(self._running)
    self._running = outputs


def restore_together(checkpointings, members):
  """(states, histories) of every member at the newest step all of them hold."""
  restored = [c.restore(m.state) for c, m in zip(checkpointings, members)]
  steps_held = {int(s.step) for s, _ in restored}
  while len(steps_held) > 1:
    logging.info('Members saved at steps %s; resuming all at step %d.',
                 sorted(steps_held), min(steps_held))
    restored = [c.restore(m.state, at_most=min(steps_held))
                for c, m in zip(checkpointings, members)]
    steps_held = {int(s.step) for s, _ in restored}
  return [s for s, _ in restored], [h for _, h in restored]


def train_together(members, inputs, stack, *, preemption, memory,
                   desc='Training', saved='the checkpoint',
                   deferred=None) -> bool:
  """Trains `members` to the end (or resumes them); False if preempted.

  Leaves each member's final host state and its evaluator, whose log stays
  open in `stack` for `evaluators.score_deferred`. `memory`
  (host_memory.Phases) marks each phase; `desc` names the progress bar,
  `saved` what a SIGTERM's save holds, in the log. `deferred`: keep every
  evaluation point for `evaluators.score_deferred` (None: as the member's
  `train.deferred_eval` says; a sweep scores all members' points at once).
  """
  config, data = members[0].config, inputs.data
  checkpointings = [stack.enter_context(checkpointing.Checkpointing(
      m.config, m.workdir, m.schedule)) for m in members]
  states, histories = restore_together(checkpointings, members)
  start_step = int(states[0].step)
  logs = [stack.enter_context(contextlib.closing(metrics_log.MetricsLog(
      m.workdir, start_step, m.config.tensorboard))) for m in members]
  for member, log, history in zip(members, logs, histories):
    member.evaluator = evaluators.create_evaluator(
        member.config, member.workdir, member.state.method, inputs, log,
        history, deferred)
  if start_step == data.total_steps:
    for member, state in zip(members, states):
      member.state = state
    return True
  if len(members) > 1:
    logging.info('%s: %s (%d combinations stacked), from step %d.', desc,
                 [m.name for m in members], len(members), start_step)
  p_step = steps.compile_train_steps(states, inputs.frozen_spec,
                                     inputs.batch_spec(),
                                     [m.schedule for m in members])
  # The executables of the op-by-op initialisation and of tracing are not
  # needed again (0.22 GB for DINOv2-S/14 SynQT): the compiled step is kept.
  devices.release_executables()
  memory.mark('compiling the train step')
  p_states = devices.replicate(tuple(states))
  with contextlib.ExitStack() as loop:
    batches = loop.enter_context(contextlib.closing(
        inputs.train_batches(config, start_step)))
    p_frozen = inputs.p_frozen
    memory.mark('putting the state on the devices'
                + (' and building the feature cache' if inputs.cached else ''))
    step_metrics = [loop.enter_context(contextlib.closing(
        metrics_log.StepMetrics(
            log, devices.unreplicate, start_step=start_step,
            total_steps=data.total_steps,
            steps_per_epoch=data.steps_per_epoch,
            batch_size=config.optim.batch_size, check=c.check_finite,
            desc=desc if i == 0 else None)))
        for i, (log, c) in enumerate(zip(logs, checkpointings))]
    in_flight = OneStepInFlight()
    for step in range(start_step + 1, data.total_steps + 1):  # Updates done.
      p_states, metrics = p_step(p_states, p_frozen, next(batches))
      in_flight.dispatched(metrics)
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        host_memory.return_freed()
        memory.mark('running the first step')
      for sm, m in zip(step_metrics, metrics):
        sm.add(step, m)
      if cadence.itstime(step, config.train.log_every_steps, data.total_steps,
                         last=False):
        for sm in step_metrics:
          sm.write()
      if members[0].evaluator.is_time(step):
        for sm, member, p_state in zip(step_metrics, members, p_states):
          sm.write()
          member.evaluator(step, p_state.params)
      preempted = preemption.requested()  # One allgather a step.
      if preempted or cadence.itstime(step, config.checkpoint_every_steps,
                                      data.total_steps):
        for sm, log, c, member, p_state in zip(
            step_metrics, logs, checkpointings, members, p_states):
          sm.write()
          log.flush()
          c.save(step, p_state, member.evaluator.history())
      if preempted:
        logging.warning('SIGTERM: saved %s at step %d; exiting. Run again '
                        'with the same workdir to resume.', saved, step)
        return False
  for member, state in zip(members, devices.unreplicate(p_states)):
    member.state = state
  return True
