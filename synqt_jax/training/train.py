"""Trains a tuning method on one task and reports its test accuracy.

`train_and_evaluate(config, workdir)` is the whole run (launch.py calls it),
a short sequence of steps: prepare the workdir, load the data, build the
method and its train state, restore the latest checkpoint, choose the batch
source (online or a feature cache) and the evaluator (immediate or deferred),
then train; the loop only asks each policy whether it is time to log,
evaluate or save.

The frozen backbone is replicated to every device once; `train_step` and
`eval_step` run under `jax.pmap` over all local devices, with gradients and
counts summed over all devices of all hosts, so one code path serves one CPU,
eight GPUs and a pod slice. Everything random is a function of (seed, step),
and the workdir's checkpoints hold the whole training state, so running again
on the same workdir resumes exactly where the last checkpoint left off.

With `train.feature_cache` (SynQT, linear) the training split's image-path K/V
(the linear probe's: its pooled features) are computed once
(`feature_cache.build`, kept in <workdir>/feature_cache/ and reused while their
fingerprint matches) and every step runs only the query path (the head) on
cached batches; the batches depend only on (seed, step), as online.
With `train.deferred_eval` (SynQT, linear) the trainable parameters of each
evaluation point are kept (<workdir>/deferred_eval/*.npz, listed in the
checkpoint metadata) and scored together at the end with one backbone pass
per evaluation split (`deferred_eval.evaluate`): same accuracies, same
results.json.

Workdir contents: config.json, checkpoints/ (orbax), metrics.jsonl and
TensorBoard events, results.json and export.npz (the trained task parameters)
when done; feature_cache/ and deferred_eval/ when those are on.
"""
import abc
import contextlib
import dataclasses
import functools
import inspect
import os
import signal
import time
from typing import Any

from absl import logging
from flax import struct
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from synqt_jax.data import batching
from synqt_jax.config import fields as config_fields
from synqt_jax.config import validation as config_validation
from synqt_jax.data import data_config
from synqt_jax.training import deferred_eval
from synqt_jax.weights import export
from synqt_jax.training import feature_cache
from synqt_jax.training import host_memory
from synqt_jax.models import methods
from synqt_jax.training import metrics_log
from synqt_jax.training import nonfinite
from synqt_jax.data import preprocess
from synqt_jax.data import sources
from synqt_jax.training import train_checkpoints
from synqt_jax.training import workdir as workdir_lib

AXIS = 'batch'  # The pmapped axis: one entry per device of every host.


class TrainState(train_state.TrainState):
  """Trainable parameters, optimizer state, step, and the run's base RNG key."""
  rng: jax.Array  # Raw uint32 key; step and device keys are folded from it.
  method: Any = struct.field(pytree_node=False, default=None)  # methods.*


# --- Configuration and data. ---

def resolve_workdir_paths(config, workdir):
  """A copy of `config` with `{workdir}` in backbone.source and data.root filled in.

  With the local directory of the workdir (workdir.local_directory): the
  workdir itself, or for a remote one a local cache directory, as these are
  read as local files.
  """
  config = config.copy_and_resolve_references()
  for section, field in (('backbone', 'source'), ('data', 'root')):
    value = config[section][field]
    if isinstance(value, str):
      config[section][field] = value.replace(
          '{workdir}', workdir_lib.local_directory(workdir))
  return config


def validated(config, workdir):
  """The config with `{workdir}` filled in, checked before anything is written."""
  config = resolve_workdir_paths(config, workdir)
  config_validation.validate(config)
  config_validation.validate_device_split(config, jax.device_count())
  config = preprocess.resolve_normalization(config)
  workdir_lib.check_directory(workdir)
  return config


def prepare_run(config, workdir):
  """Checks that `workdir` holds this run (or none), then writes config.json.

  `config.prepare` ('module.function', e.g. synqt_jax.demo.prepare) is
  called with the config first: it may write what the run reads.
  """
  workdir_lib.check_identity(workdir, config)
  if config.prepare:
    config_fields.function(config.prepare)(config)
  write_json(workdir_lib.as_path(workdir) / 'config.json',
              config_fields.without_aliases(config.to_dict()))


@dataclasses.dataclass(frozen=True)
class Data:
  """The task's splits and the run's length in steps."""
  train: sources.Source
  evaluation: dict[str, sources.Source]  # 'test', and 'val' if any.
  steps_per_epoch: int
  total_steps: int

  @classmethod
  def load(cls, config):
    data = config.data
    train = data_config.load_source(data, data.train_split, in_memory=True)
    evaluation = {'test': data_config.load_source(data, data.test_split)}
    if data.val_split:
      evaluation['val'] = data_config.load_source(data, data.val_split)
    for source in evaluation.values():  # A bad image stops the run now,
      source.check_images()             # not after hours of training.
    steps_per_epoch = batching.steps_per_epoch(len(train),
                                                     config.optim.batch_size)
    return cls(train, evaluation, steps_per_epoch,
               config.optim.epochs * steps_per_epoch)


# --- Optimizer and state. ---

def learning_rate_schedule(optim, steps_per_epoch):
  """The reference's per-step learning rate, indexed by optimizer step.

  lr(t), t = step / steps_per_epoch in epochs: lr * t / warmup for t < warmup,
  then min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup) / (epochs -
  warmup))) / 2. Step 0 has learning rate 0.
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr,
      warmup_steps=optim.warmup_epochs * steps_per_epoch,
      decay_steps=optim.epochs * steps_per_epoch, end_value=optim.min_lr)


def optimizer_arguments(optim):
  """(name, kwargs) of the optax optimizer `optim` describes.

  kwargs: the `optim` fields that are parameters of optax.<name> (b1, b2, eps
  and weight_decay for the default AdamW), updated by `optim.optax`.
  """
  name = optim.get('name', config_fields.DEFAULT_OPTIMIZER)
  parameters = inspect.signature(getattr(optax, name)).parameters
  kwargs = {k: v for k, v in optim.items()
            if k in parameters and k != 'learning_rate'}
  kwargs.update(optim.get('optax', {}))
  return name, kwargs


def create_optimizer(optim, learning_rate_fn):
  """optax.<optim.name>(learning_rate_fn, ...); AdamW is PyTorch's AdamW
  (decoupled weight decay on every trainable tensor)."""
  name, kwargs = optimizer_arguments(optim)
  return getattr(optax, name)(learning_rate_fn, **kwargs)


def create_train_state(method, frozen, optimizer, seed, image_size):
  """The initial state, on the host as numpy arrays (unreplicated)."""
  init_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = method.init(init_rng, frozen, images)
  state = TrainState.create(apply_fn=method.apply, params=params, tx=optimizer,
                            rng=run_rng, method=method)
  state = jax.tree.map(np.asarray, jax.device_get(state))
  # The op-by-op initialisation's executables are not needed again, and the
  # train step compiles next (ViT-B/16 SynQT: 0.2 GB).
  release_executables()
  return state


def release_executables():
  """Drops JAX's cached executables and traces (a compiled step its caller
  holds stays) and hands the heap they freed back to the system."""
  jax.clear_caches()
  host_memory.return_freed()


def compiler_options():
  """XLA options for the train step on this backend.

  XLA:CPU's newer fusion emitters took ~0.65 GB of host memory to compile a
  ViT-B/16 SynQT step, the classic ones ~0.25 GB, for steps as fast (within
  the ~5 % noise of a 2-core CPU).
  """
  return {'xla_cpu_use_fusion_emitters': False} if jax.default_backend() == 'cpu' else {}


def replicate(tree):
  """A copy of `tree` on every local device, laid out as pmap's own outputs.

  Each device's copy is put straight from the host array: no host array of
  all the copies stacked, and on a CPU device a 64-byte aligned host array
  becomes the device buffer itself.
  (flax.jax_utils.replicate names its mesh axis differently from the pmapped
  axis, which makes pmap compile a second time on the second step.)
  """
  devices = jax.local_devices()
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                               jax.P(AXIS))

  def put(x):
    one = np.asarray(x)[None]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + one.shape[1:], sharding,
        [jax.device_put(one, device) for device in devices])

  return jax.tree.map(put, tree)


def unreplicate(tree):
  """Device 0's copy of a replicated tree, as host numpy arrays.

  Reads one local shard directly: no compiled indexing op, and it works on
  every host of a multi-host run.
  """
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]),
      tree)


# --- The steps under pmap. ---

def logits_of(method, params, frozen, batch, train, rngs=None):
  """The model's logits for a batch; the one place that reads its inputs.

  A batch holds 'image' (online: `method.apply`) or 'kv' (cached image-path
  K/V, `feature_cache`: `method.apply_kv`, which runs only the query path).
  """
  if 'kv' in batch:  # In train.cache_dtype: the query path casts each block's.
    return method.apply_kv(params, frozen, batch['kv'], train=train, rngs=rngs)
  return method.apply(params, frozen, batch['image'], train=train, rngs=rngs)


def gradients(method, params, rng, step, frozen, batch):
  """(loss, gradients) of the global batch (run under pmap, axis 'batch').

  The loss is the mean cross-entropy over the real (mask 1) examples of the
  global batch, and so is the gradient, whatever the device count. Each device
  draws its own dropout and drop-path keys, fold_in(fold_in(rng, step),
  device index). `train_step` applies them; a sweep (sweep.py) vmaps this over
  stacked parameters, keys and steps.
  """
  device_rng = jax.random.fold_in(jax.random.fold_in(rng, step),
                                  jax.lax.axis_index(AXIS))
  dropout_rng, drop_path_rng = jax.random.split(device_rng)
  rngs = {'dropout': dropout_rng, 'drop_path': drop_path_rng}
  global_count = jax.lax.psum(batch['mask'].sum(), AXIS)

  def loss_fn(params):
    logits = logits_of(method, params, frozen, batch, True, rngs)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['label'])
    return jnp.sum(batch['mask'] * losses) / global_count

  local_loss, local_grads = jax.value_and_grad(loss_fn)(params)
  # One all-reduce for the whole gradient, not one per tensor.
  local_flat, unflatten = jax.flatten_util.ravel_pytree(local_grads)
  loss, flat_grads = jax.lax.psum((local_loss, local_flat), AXIS)
  return loss, unflatten(flat_grads)


def apply_update(state, loss, grads, learning_rate_fn):
  """(state after the optimizer's update with `grads`, the step's metrics)."""
  metrics = {'loss': loss, 'learning_rate': learning_rate_fn(state.step)}
  return state.apply_gradients(grads=grads), metrics


def train_step(state, frozen, batch, learning_rate_fn):
  """One optimizer update on the global batch (run under pmap, axis 'batch')."""
  loss, grads = gradients(state.method, state.params, state.rng, state.step,
                          frozen, batch)
  return apply_update(state, loss, grads, learning_rate_fn)


def compile_train_step(config, method, schedule, state, frozen, image_size):
  """The pmapped `train_step`, compiled for the run's host trees before any is placed.

  Compiling holds host memory that is freed afterwards (~0.25 GB for a ViT-B
  step on a CPU, `compiler_options`): done first, it does not stack on the backbone, the state
  and a feature cache. Over several processes pmap lowers concrete arrays
  only: there it compiles at its first call.
  """
  step = jax.pmap(functools.partial(train_step, learning_rate_fn=schedule),
                  axis_name=AXIS, donate_argnums=(0,))
  if jax.process_count() > 1:
    return step
  if config.train.feature_cache == 'none':
    batch = batching.train_batch_spec(config.optim.batch_size, image_size)
  else:
    batch = feature_cache.batch_spec(config.optim.batch_size, method.cache_row_shape,
                                     config.train.cache_dtype)
  devices = jax.local_device_count()
  replicated = functools.partial(jax.tree.map, lambda x: jax.ShapeDtypeStruct(
      (devices,) + np.shape(x), np.asarray(x).dtype))
  start = time.perf_counter()
  compiled = step.lower(replicated(state), replicated(frozen), batch).compile(
      compiler_options())
  logging.info('Compiled the train step in %.1f s.', time.perf_counter() - start)
  return compiled


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


def eval_step(method, params, frozen, batch):
  """Correct predictions and real examples in the global batch (under pmap)."""
  logits = logits_of(method, params, frozen, batch, False)
  correct = (jnp.argmax(logits, -1) == batch['label']) * batch['mask']
  return jax.lax.psum({'correct': correct.sum(), 'count': batch['mask'].sum()},
                      AXIS)


# --- Batch source: online, or from a feature cache. ---

def open_train_batches(config, workdir, method, frozen, p_frozen, data,
                       start_step, cache=None):
  """The training batches from `start_step` on: online, or cached K/V.

  With `train.feature_cache` the batches come from `cache`, or from the one
  `open_feature_cache` builds; `frozen` is the host copy of the frozen
  parameters, `p_frozen` the replicated one.
  """
  num_steps = data.total_steps - start_step
  if config.train.feature_cache == 'none':
    return batching.train_batches(
        data.train, config.optim.batch_size, seed=config.seed,
        normalization=config.data.normalization, start_step=start_step,
        num_steps=num_steps)
  if cache is None:
    cache = open_feature_cache(config, workdir, method, frozen, p_frozen, data)
  return cache.batches(config.optim.batch_size, seed=config.seed,
                       start_step=start_step, num_steps=num_steps)


def open_feature_cache(config, workdir, method, frozen, p_frozen, data):
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
          backbone_digest=feature_cache.backbone_digest(frozen),
          vit=method.vit, data_config=config.data,
          split=config.data.train_split) if kept else None)
  logging.info('Feature cache: %s.', cache.provenance)
  return cache


# --- Evaluators: immediate or deferred, over every evaluation split. ---

class Evaluator(abc.ABC):
  """Scores the trainable parameters at every evaluation point, on each split.

  The points are every `eval_every_epochs` epochs and the last step. An
  evaluation is {'step', 'epoch', '<split>_accuracy', ...}; points kept for a
  deferred evaluation (also those of a resumed run's earlier part) are
  scored by `finish`.
  """

  def __init__(self, config, workdir, method, p_frozen, data, log, history):
    self._config, self._workdir = config, workdir
    self._method, self._p_frozen = method, p_frozen
    self._data, self._log = data, log
    self.evaluations = list(history.get('evaluations', []))
    self.deferred = list(history.get('deferred_evaluations', []))
    self._kept = {}  # step -> trainable parameters (host numpy) of this run.

  def is_time(self, step) -> bool:
    epoch, end_of_epoch = divmod(step, self._data.steps_per_epoch)
    return step == self._data.total_steps or (
        end_of_epoch == 0 and epoch % self._config.eval_every_epochs == 0)

  @abc.abstractmethod
  def __call__(self, step, p_params) -> None:
    """Evaluates (or keeps for later) the replicated parameters at `step`."""

  def history(self) -> dict:
    """What a checkpoint keeps so that a resumed run reports the same."""
    return {'evaluations': self.evaluations,
            'deferred_evaluations': self.deferred}

  def _point(self, step):
    return {'step': step, 'epoch': step // self._data.steps_per_epoch}

  def _report(self, evaluation):
    self._log.write(evaluation['step'],
                    {k: v for k, v in evaluation.items() if k != 'step'})
    logging.info('Epoch %d: %s', evaluation['epoch'], evaluation)

  def finish(self) -> list[dict]:
    """Every evaluation, in step order, the deferred ones scored now."""
    if self.deferred:
      logging.info('Deferred evaluation of %d parameter sets (steps %s).',
                   len(self.deferred), [p['step'] for p in self.deferred])
      parameter_sets = self.deferred_parameters()
      accuracies = {}  # split -> one accuracy per deferred point.
      for name, source in self._data.evaluation.items():
        accuracies[name] = deferred_eval.evaluate(
            self._method, self._p_frozen, parameter_sets, source,
            self._config.eval_batch_size,
            normalization=self._config.data.normalization).accuracies
      self.record_deferred(accuracies)
    return self.evaluations

  def deferred_parameters(self) -> list:
    """The trainable parameters of each deferred point, in order."""
    return [self._kept[p['step']] if p['step'] in self._kept
            else export.load(_kept_params_path(self._workdir, p['step']))[0]
            for p in self.deferred]

  def record_deferred(self, accuracies: dict) -> None:
    """Adds the deferred points' scores ({split: [accuracy per point]})."""
    scored = [dict(p) for p in self.deferred]
    for name, split_accuracies in accuracies.items():
      for evaluation, accuracy in zip(scored, split_accuracies):
        evaluation[f'{name}_accuracy'] = accuracy
    for evaluation in scored:
      self._report(evaluation)
    self.evaluations = sorted(self.evaluations + scored,
                              key=lambda e: e['step'])
    self._log.flush()


class ImmediateEvaluator(Evaluator):
  """Evaluates at each point: one backbone pass per split and point."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._p_eval_step = jax.pmap(functools.partial(eval_step, self._method),
                                 axis_name=AXIS)

  def __call__(self, step, p_params):
    evaluation = self._point(step)
    for name, source in self._data.evaluation.items():
      evaluation[f'{name}_accuracy'] = self._accuracy(p_params, source)
    self.evaluations.append(evaluation)
    self._report(evaluation)

  def _accuracy(self, p_params, source):
    """Accuracy on `source` (every example once; all hosts get the same)."""
    correct = count = 0
    for batch in batching.eval_batches(
        source, self._config.eval_batch_size,
        normalization=self._config.data.normalization):
      counts = unreplicate(self._p_eval_step(p_params, self._p_frozen, batch))
      correct += int(counts['correct'])
      count += int(counts['count'])
    return correct / count


class DeferredEvaluator(Evaluator):
  """Keeps the parameters of each point; `finish` scores them all together."""

  def __call__(self, step, p_params):
    point = self._point(step)
    # A copy: the next step donates the replicated buffers.
    self._kept[step] = jax.tree.map(np.array, unreplicate(p_params))
    path = _kept_params_path(self._workdir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    export.save(path, self._kept[step], dict(point))
    self.deferred.append(point)
    logging.info('Epoch %d: parameters kept for the deferred evaluation.',
                 point['epoch'])


def _kept_params_path(workdir, step):
  """Where the trainable parameters of the evaluation point at `step` are kept.

  One file per process, so hosts sharing a workdir never write the same file.
  """
  return (workdir_lib.as_path(workdir) / 'deferred_eval' /
          f'step_{step}.process_{jax.process_index()}.npz')


def create_evaluator(config, workdir, method, p_frozen, data, log,
                     history) -> Evaluator:
  """The evaluator `config.train.deferred_eval` chooses."""
  kind = DeferredEvaluator if config.train.deferred_eval else ImmediateEvaluator
  return kind(config, workdir, method, p_frozen, data, log, history)


# --- Checkpoints and preemption. ---

class Preemption:
  """SIGTERM sets a flag; the loop saves at the next step and exits cleanly."""

  def __init__(self):
    self._requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self) -> bool:
    """True on every host as soon as any host got SIGTERM."""
    if jax.process_count() == 1:
      return self._requested
    return bool(multihost_utils.process_allgather(
        np.int32(self._requested)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Checkpointing:
  """When the run saves: every `checkpoint_every_steps`, at the last step, and
  at the step after a SIGTERM, after which it stops (`preempted`); and that
  nothing non-finite is ever saved (`check_finite`, `save`).

  A context manager: SIGTERM is caught inside it; on exit the saves in
  flight are finished.
  """

  def __init__(self, config, workdir, total_steps, schedule):
    self._every, self._total_steps = config.checkpoint_every_steps, total_steps
    self._schedule = schedule
    self._checkpoints = train_checkpoints.TrainCheckpoints(
        workdir_lib.as_path(workdir) / 'checkpoints',
        config.keep_checkpoints)
    self._preemption = None
    self.preempted = False

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._checkpoints.wait_until_finished()
    self._checkpoints.close()
    if self._preemption is not None:
      self._preemption.restore()

  def restore(self, state, at_most=None):
    """(state, history): the newest checkpoint's (at step <= `at_most` if
    given), or `state` and no history."""
    restored = self._checkpoints.restore_latest(state, at_most)
    if restored is None:
      return state, {}
    state, metadata = restored
    logging.info('Resuming from the checkpoint at step %d.', int(state.step))
    return state, metadata

  def catch_sigterm(self, preemption=None):
    """From here on a SIGTERM ends the run at the next step, saved.

    `preemption`: a `Preemption` to share (a sweep's members share one).
    """
    self._preemption = preemption or Preemption()

  def is_time(self, step) -> bool:
    """Whether to save after `step` (every host asks at every step)."""
    self.preempted = self._preemption.requested()
    return (step % self._every == 0 or step == self._total_steps
            or self.preempted)

  def check_finite(self, step, scalars=None, params=None):
    """Stops the run (nonfinite.DivergedError) at a non-finite loss or parameter."""
    nonfinite.check_step(
        step, float(self._schedule(step - 1)), self._checkpoints.latest_step(),
        self._checkpoints.directory, params=params,
        loss=(scalars or {}).get('loss'))

  def save(self, step, p_state, history):
    state = unreplicate(p_state)
    self.check_finite(step, params=state.params)
    self._checkpoints.save(step, state, {'data_position': step, **history})


# --- The run. ---

def results_summary(config, evaluations, trainable_params):
  """results.json: the final accuracy first, the best-of-evaluations beside it."""
  final = evaluations[-1]
  best = max(evaluations, key=lambda e: e['test_accuracy'])
  return {
      'task': config.data.task,
      'method': config.method,
      'test_accuracy': final['test_accuracy'],
      **({'val_accuracy': final['val_accuracy']}
         if 'val_accuracy' in final else {}),
      'epoch': final['epoch'],
      'best_of_evaluations': {
          'test_accuracy': best['test_accuracy'], 'epoch': best['epoch'],
          'selected_on': 'the test set (as the reference reports it; '
                         'optimistic, not a held-out choice)'},
      'evaluations': evaluations,
      'trainable_params': trainable_params,
      'checkpoint': config.backbone.source,
  }


def write_json(path, data):
  if jax.process_index() == 0:
    workdir_lib.write_json(path, data)


def log_run(config, data, state):
  name, kwargs = optimizer_arguments(config.optim)
  logging.info('Task %s: %d training images, %d steps of %d (%d epochs). '
               'Trainable parameters: %d (the reference\'s unused pre_norm and '
               'combine weight vector are left out). Optimizer: optax.%s(%s).',
               data.train.name, len(data.train), data.total_steps,
               config.optim.batch_size, config.optim.epochs,
               methods.trainable_count(state.params), name,
               ', '.join(f'{k}={v!r}' for k, v in kwargs.items()))
  logging.info('Devices: %d in all, %d on this host (process %d of %d): %s.',
               jax.device_count(), jax.local_device_count(),
               jax.process_index(), jax.process_count(), jax.local_devices())


def train_and_evaluate(config, workdir):
  """Trains (or resumes) in `workdir`; returns the results, or None if preempted.

  One run at a time holds the workdir (workdir.locked).
  """
  config = validated(config, workdir)
  workdir_lib.as_path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lib.locked(workdir, jax.process_index()):
    return run(config, workdir)


def run(config, workdir):
  """What a run does, in order; `workdir` is held by this process."""
  prepare_run(config, workdir)
  memory = host_memory.Phases()
  data = Data.load(config)
  memory.mark('loading the data')
  schedule = learning_rate_schedule(config.optim, data.steps_per_epoch)
  method, frozen = methods.create_method(config)
  memory.mark('loading the backbone')
  nonfinite.check_backbone(frozen['backbone'], config.backbone.source)
  workdir_lib.check_identity(
      workdir, config, backbone_digest=feature_cache.backbone_digest(frozen))
  state = create_train_state(method, frozen,
                             create_optimizer(config.optim, schedule),
                             config.seed, config.data.image_size)
  # What the trainable state took over (full fine-tuning's backbone) is not
  # also kept frozen: the devices hold it once.
  frozen = {k: v for k, v in frozen.items() if k not in state.params}
  log_run(config, data, state)

  with contextlib.ExitStack() as stack:
    checkpoints = stack.enter_context(
        Checkpointing(config, workdir, data.total_steps, schedule))
    state, history = checkpoints.restore(state)
    start_step = int(state.step)
    # From here a SIGTERM (also while compiling, or building a cache) ends the
    # run saved after its next step.
    checkpoints.catch_sigterm()
    p_train_step = compile_train_step(config, method, schedule, state, frozen,
                                      data.train.image_size)
    # The executables of the op-by-op initialisation and of tracing are not
    # needed again (0.22 GB for DINOv2-S/14 SynQT): the compiled step is kept.
    release_executables()
    memory.mark('compiling the train step')
    p_state, p_frozen = replicate(state), replicate(frozen)
    batches = stack.enter_context(contextlib.closing(open_train_batches(
        config, workdir, method, frozen, p_frozen, data, start_step)))
    del frozen  # The host copy: the devices have theirs.
    memory.mark('putting the state on the devices'
                + (' and building the feature cache'
                   if config.train.feature_cache != 'none' else ''))
    log = stack.enter_context(contextlib.closing(metrics_log.MetricsLog(
        workdir, start_step, config.tensorboard)))
    step_metrics = stack.enter_context(contextlib.closing(
        metrics_log.StepMetrics(
            log, unreplicate, start_step=start_step,
            total_steps=data.total_steps,
            steps_per_epoch=data.steps_per_epoch,
            batch_size=config.optim.batch_size,
            check=checkpoints.check_finite)))
    evaluator = create_evaluator(config, workdir, method, p_frozen, data, log,
                                 history)

    in_flight = OneStepInFlight()
    for step in range(start_step + 1, data.total_steps + 1):  # Updates done.
      p_state, metrics = p_train_step(p_state, p_frozen, next(batches))
      in_flight.dispatched(metrics)
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        host_memory.return_freed()
        memory.mark('running the first step')
      step_metrics.add(step, metrics)
      if step % config.train.log_every_steps == 0:
        step_metrics.write()
      if evaluator.is_time(step):
        step_metrics.write()
        evaluator(step, p_state.params)
      if checkpoints.is_time(step):
        step_metrics.write()
        log.flush()
        checkpoints.save(step, p_state, evaluator.history())
      if checkpoints.preempted:
        logging.warning('SIGTERM: saved the checkpoint at step %d; exiting. '
                        'Run again with the same workdir to resume.', step)
        return None
    memory.mark('training')
    evaluations = evaluator.finish()
    memory.mark('evaluating' + (' (deferred)' if config.train.deferred_eval else ''))
  write_json(workdir_lib.as_path(workdir) / host_memory.FILE, memory.records)
  return finish_run(config, workdir, evaluations, unreplicate(p_state.params),
                    data.total_steps)


def finish_run(config, workdir, evaluations, params, total_steps):
  """Writes results.json and export.npz (the host `params`); returns the results."""
  results = results_summary(config, evaluations,
                            methods.trainable_count(params))
  write_json(workdir_lib.as_path(workdir) / 'results.json', results)
  if jax.process_index() == 0:
    export.save(workdir_lib.as_path(workdir) / 'export.npz', params,
                export.metadata(config, step=total_steps,
                                test_accuracy=results['test_accuracy']))
  best = ('' if len(evaluations) == 1 else ' (best of evaluations, selected on '
          f'the test set: {results["best_of_evaluations"]["test_accuracy"]:.4f})')
  logging.info('Test accuracy %.4f after %d epochs%s.', results['test_accuracy'],
               results['epoch'], best)
  return results
