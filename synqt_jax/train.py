"""Trains a tuning method on one task and reports its test accuracy.

`train_and_evaluate(config, workdir)` is the whole run (launch.py calls it):
the frozen backbone is replicated to every device once; `train_step` and
`eval_step` run under `jax.pmap` over all local devices, with gradients and
counts summed over all devices of all hosts, so one code path serves one CPU,
eight GPUs and a pod slice. Everything random is a function of (seed, step),
and the workdir's checkpoints hold the whole training state, so running again
on the same workdir resumes exactly where the last checkpoint left off.

With `train.feature_cache` (SynQT only) the training split's image-path K/V
are computed once (`feature_cache.build`, kept in <workdir>/feature_cache/ and
reused while their fingerprint matches) and every step runs only the query
path on cached batches; the batches depend only on (seed, step), as online.
With `train.deferred_eval` (SynQT only) the trainable parameters of each
evaluation point are kept (<workdir>/deferred_eval/*.npz, listed in the
checkpoint metadata) and scored together at the end with one backbone pass
per evaluation split (`deferred_eval.evaluate`): same accuracies, same
results.json.

Workdir contents: config.json, checkpoints/ (orbax), metrics.jsonl and
TensorBoard events, results.json and export.npz (the trained task parameters)
when done; feature_cache/ and deferred_eval/ when those are on.
"""
import dataclasses
import functools
import json
import os
import signal
import time

from absl import logging
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from synqt_jax import checkpoint
from synqt_jax import config_validation
from synqt_jax import deferred_eval
from synqt_jax import demo
from synqt_jax import export
from synqt_jax import feature_cache
from synqt_jax import input_pipeline
from synqt_jax import methods
from synqt_jax import metrics_log
from synqt_jax import train_checkpoints

AXIS = 'batch'  # The pmapped axis: one entry per device of every host.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TrainState(train_state.TrainState):
  """Trainable parameters, AdamW state, step, and the run's base RNG key."""
  rng: jax.Array  # Raw uint32 key; step and device keys are folded from it.


def resolve_workdir_paths(config, workdir):
  """A copy of `config` with `{workdir}` in checkpoint.source and data.root filled in."""
  config = config.copy_and_resolve_references()
  for section, field in (('checkpoint', 'source'), ('data', 'root')):
    value = config[section][field]
    if isinstance(value, str):
      config[section][field] = value.replace('{workdir}',
                                             os.path.abspath(workdir))
  return config


def create_method(config):
  """(method, frozen) for `config`: the backbone is loaded headless.

  With a feature cache the image path has no stochastic depth (its cached K/V
  are computed once, without it): SynQTConfig.image_drop_path=False.
  """
  vit, backbone = checkpoint.load(
      config.checkpoint.source, image_size=config.data.image_size,
      collection=config.checkpoint.collection,
      cache_dir=config.checkpoint.cache_dir, headless=True,
      dtype=DTYPES[config.dtype])
  method = methods.from_config(config, vit)
  # (An export's config, read by predict.py, may hold no `train` section.)
  if config.get('train', {}).get('feature_cache', 'none') != 'none':
    method = dataclasses.replace(
        method, config=dataclasses.replace(method.config,
                                           image_drop_path=False))
  return method, {'backbone': backbone}


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


def create_optimizer(optim, learning_rate_fn):
  """PyTorch's AdamW: decoupled weight decay on every trainable tensor."""
  return optax.adamw(learning_rate_fn, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay)


def create_train_state(method, frozen, optimizer, seed, image_size):
  """The initial state, on the host as numpy arrays (unreplicated)."""
  init_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = method.init(init_rng, frozen, images)
  state = TrainState.create(apply_fn=method.apply, params=params, tx=optimizer,
                            rng=run_rng)
  return jax.tree.map(np.asarray, jax.device_get(state))


def replicate(tree):
  """A copy of `tree` on every local device, laid out as pmap's own outputs.

  (flax.jax_utils.replicate names its mesh axis differently from the pmapped
  axis, which makes pmap compile a second time on the second step.)
  """
  devices = jax.local_devices()
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                               jax.P(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)),
                               sharding), tree)


def unreplicate(tree):
  """Device 0's copy of a replicated tree, as host numpy arrays.

  Reads one local shard directly: no compiled indexing op, and it works on
  every host of a multi-host run.
  """
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]),
      tree)


def logits_of(apply_fn, params, frozen, batch, train, rngs=None):
  """The model's logits for a batch; the one place that reads its inputs.

  A batch holds 'image' (online: `apply_fn`, a method's `apply`) or 'kv'
  (cached image-path K/V, `feature_cache`: the `apply_kv` of the method that
  `apply_fn` is bound to, which runs only the query path).
  """
  if 'kv' in batch:
    method = getattr(apply_fn, '__self__', None)
    if not hasattr(method, 'apply_kv'):
      raise ValueError('A batch of cached K/V needs a method with apply_kv '
                       f'(SynQT); got apply_fn={apply_fn!r}.')
    # bfloat16 is a storage format (train.cache_dtype): compute in the model's.
    kv = batch['kv'].astype(method.vit.dtype)
    return method.apply_kv(params, frozen, kv, train=train, rngs=rngs)
  return apply_fn(params, frozen, batch['image'], train=train, rngs=rngs)


def train_step(state, frozen, batch, learning_rate_fn):
  """One AdamW update on the global batch (run under pmap, axis 'batch').

  The loss is the mean cross-entropy over the real (mask 1) examples of the
  global batch, and so is the gradient, whatever the device count. Each device
  draws its own dropout and drop-path keys, fold_in(fold_in(rng, step),
  device index).
  """
  device_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                  jax.lax.axis_index(AXIS))
  dropout_rng, drop_path_rng = jax.random.split(device_rng)
  rngs = {'dropout': dropout_rng, 'drop_path': drop_path_rng}
  global_count = jax.lax.psum(batch['mask'].sum(), AXIS)

  def loss_fn(params):
    logits = logits_of(state.apply_fn, params, frozen, batch, True, rngs)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['label'])
    return jnp.sum(batch['mask'] * losses) / global_count

  local_loss, local_grads = jax.value_and_grad(loss_fn)(state.params)
  # One all-reduce for the whole gradient, not one per tensor.
  local_flat, unflatten = jax.flatten_util.ravel_pytree(local_grads)
  loss, flat_grads = jax.lax.psum((local_loss, local_flat), AXIS)
  grads = unflatten(flat_grads)
  metrics = {'loss': loss, 'learning_rate': learning_rate_fn(state.step)}
  return state.apply_gradients(grads=grads), metrics


def eval_step(apply_fn, params, frozen, batch):
  """Correct predictions and real examples in the global batch (under pmap)."""
  logits = logits_of(apply_fn, params, frozen, batch, False)
  correct = (jnp.argmax(logits, -1) == batch['label']) * batch['mask']
  return jax.lax.psum({'correct': correct.sum(), 'count': batch['mask'].sum()},
                      AXIS)


def evaluate(p_eval_step, params, frozen, source, config):
  """Accuracy on `source` (every example once; all hosts get the same)."""
  correct = count = 0
  for batch in input_pipeline.eval_batches(
      source, config.eval_batch_size,
      normalization=config.data.normalization):
    counts = unreplicate(p_eval_step(params, frozen, batch))
    correct += int(counts['correct'])
    count += int(counts['count'])
  return correct / count


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
      'checkpoint': config.checkpoint.source,
  }


def build_feature_cache(config, workdir, method, frozen, replicated_frozen,
                        train_source):
  """The training split's K/V cache (config.train.feature_cache), in <workdir>/feature_cache/."""
  logging.info(
      "Feature cache '%s' (%s): stochastic depth on the image path is off "
      '(its K/V are computed once, without it); the query path keeps its '
      'drop path (synqt.drop_path=%s) as configured.',
      config.train.feature_cache, config.train.cache_dtype,
      config.synqt.drop_path)
  fingerprint = feature_cache.fingerprint(
      backbone_digest=feature_cache.backbone_digest(frozen), vit=method.vit,
      data_config=config.data, split=config.data.train_split)
  cache = feature_cache.build(
      method, replicated_frozen, train_source,
      normalization=config.data.normalization,
      mode=config.train.feature_cache,
      storage_dtype=config.train.cache_dtype,
      batch_size=config.eval_batch_size,
      directory=os.path.join(os.path.abspath(workdir), 'feature_cache'),
      name='train', fingerprint=fingerprint)
  logging.info('Feature cache: %s.', cache.provenance)
  return cache


def _kept_params_path(workdir, step):
  """Where the trainable parameters of the evaluation point at `step` are kept.

  One file per process, so hosts sharing a workdir never write the same file.
  """
  return os.path.join(os.path.abspath(workdir), 'deferred_eval',
                      f'step_{step}.process_{jax.process_index()}.npz')


def keep_params(workdir, point, params):
  """Writes the parameters of evaluation `point` ({'step', 'epoch'}) to the workdir."""
  path = _kept_params_path(workdir, point['step'])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  export.save(path, params, dict(point))


def evaluate_deferred(method, frozen, points, kept, workdir, eval_sources,
                      config):
  """The evaluations of `points`, as separate evaluations would give them.

  `kept` maps step -> parameters held in memory; the rest (a resumed run's
  earlier points) are read from the workdir. One backbone pass per split.
  """
  parameter_sets = [
      kept[p['step']] if p['step'] in kept
      else export.load(_kept_params_path(workdir, p['step']))[0]
      for p in points]
  evaluations = [{'step': p['step'], 'epoch': p['epoch']} for p in points]
  for name, source in eval_sources.items():
    scores = deferred_eval.evaluate(
        method, frozen, parameter_sets, source, config.eval_batch_size,
        normalization=config.data.normalization)
    for evaluation, accuracy in zip(evaluations, scores.accuracies):
      evaluation[f'{name}_accuracy'] = accuracy
  return evaluations


def _write_json(path, data):
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(data, f, indent=2)


def train_and_evaluate(config, workdir):
  """Trains (or resumes) in `workdir`; returns the results, or None if preempted."""
  config = resolve_workdir_paths(config, workdir)
  config_validation.validate(config)
  config_validation.validate_device_split(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  if config.demo:
    demo.prepare(config)
  _write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  train_source = input_pipeline.load_source(config.data, config.data.train_split,
                                            in_memory=True)
  eval_sources = {'test': input_pipeline.load_source(config.data,
                                                     config.data.test_split)}
  if config.data.val_split:
    eval_sources['val'] = input_pipeline.load_source(config.data,
                                                     config.data.val_split)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_source),
                                                   config.optim.batch_size)
  total_steps = config.optim.epochs * steps_per_epoch
  learning_rate_fn = learning_rate_schedule(config.optim, steps_per_epoch)

  method, frozen = create_method(config)
  state = create_train_state(method, frozen,
                             create_optimizer(config.optim, learning_rate_fn),
                             config.seed, config.data.image_size)
  # What the trainable state took over (full fine-tuning's backbone) is not
  # also kept frozen: the devices hold it once.
  frozen = {k: v for k, v in frozen.items() if k not in state.params}
  trainable_params = methods.trainable_count(state.params)
  logging.info('Task %s: %d training images, %d steps of %d (%d epochs). '
               'Trainable parameters: %d (the reference\'s unused pre_norm and '
               'combine weight vector are left out).', train_source.name,
               len(train_source), total_steps, config.optim.batch_size,
               config.optim.epochs, trainable_params)
  logging.info('Devices: %d in all, %d on this host (process %d of %d): %s.',
               jax.device_count(), jax.local_device_count(),
               jax.process_index(), jax.process_count(), jax.local_devices())

  checkpoints = train_checkpoints.TrainCheckpoints(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      config.keep_checkpoints)
  restored = checkpoints.restore_latest(state)
  evaluations = []
  deferred = []  # Evaluation points ({'step', 'epoch'}) not yet scored.
  kept = {}  # step -> trainable parameters (host numpy) of deferred points.
  if restored is not None:
    state, metadata = restored
    evaluations = metadata['evaluations']
    deferred = metadata.get('deferred_evaluations', [])
    logging.info('Resuming from the checkpoint at step %d.', int(state.step))
  start_step = int(state.step)

  unreplicated_frozen = frozen
  frozen = replicate(frozen)
  p_state = replicate(state)
  cache = None
  if config.train.feature_cache != 'none':
    cache = build_feature_cache(config, workdir, method, unreplicated_frozen,
                                frozen, train_source)
  del unreplicated_frozen
  p_train_step = jax.pmap(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn),
      axis_name=AXIS, donate_argnums=(0,))
  p_eval_step = jax.pmap(functools.partial(eval_step, method.apply),
                         axis_name=AXIS)
  metrics = metrics_log.MetricsLog(workdir, start_step, config.tensorboard)
  preemption = Preemption()

  if cache is not None:
    batches = cache.batches(config.optim.batch_size, seed=config.seed,
                            start_step=start_step,
                            num_steps=total_steps - start_step)
  else:
    batches = input_pipeline.train_batches(
        train_source, config.optim.batch_size, seed=config.seed,
        normalization=config.data.normalization, start_step=start_step,
        num_steps=total_steps - start_step)
  pending = []  # (step, device metrics) not yet written: no per-step sync.
  window_start = time.perf_counter()
  bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                  disable=jax.process_index() != 0, desc='Training')

  def write_pending():
    """Writes the metrics of the steps run since the last call."""
    nonlocal pending, window_start
    if not pending:
      return
    values = unreplicate([m for _, m in pending])
    images_per_sec = (len(pending) * config.optim.batch_size /
                      (time.perf_counter() - window_start))
    for (step, _), step_metrics in zip(pending, values):
      scalars = {'epoch': (step + 1) / steps_per_epoch,
                 **{k: float(v) for k, v in step_metrics.items()}}
      if step == pending[-1][0]:
        scalars['images_per_sec'] = images_per_sec
      metrics.write(step + 1, scalars)
    bar.set_postfix(loss=f'{scalars["loss"]:.4f}',
                    lr=f'{scalars["learning_rate"]:.2e}',
                    img_s=f'{images_per_sec:.0f}')
    bar.update(len(pending))
    pending, window_start = [], time.perf_counter()

  try:
    for step in range(start_step, total_steps):
      p_state, step_metrics = p_train_step(p_state, frozen, next(batches))
      pending.append((step, step_metrics))
      done = step + 1
      if done % config.train.log_every_steps == 0:
        write_pending()
      epoch, end_of_epoch = divmod(done, steps_per_epoch)
      if done == total_steps or (
          end_of_epoch == 0 and epoch % config.eval_every_epochs == 0):
        write_pending()
        evaluation = {'step': done, 'epoch': epoch}
        if config.train.deferred_eval:
          # A copy: the next step donates the replicated buffers.
          kept[done] = jax.tree.map(np.array, unreplicate(p_state.params))
          keep_params(workdir, evaluation, kept[done])
          deferred.append(evaluation)
          logging.info('Epoch %d: parameters kept for the deferred '
                       'evaluation.', epoch)
        else:
          for name, source in eval_sources.items():
            evaluation[f'{name}_accuracy'] = evaluate(
                p_eval_step, p_state.params, frozen, source, config)
          evaluations.append(evaluation)
          metrics.write(done, {k: v for k, v in evaluation.items()
                               if k != 'step'})
          logging.info('Epoch %d: %s', epoch, evaluation)
      preempted = preemption.requested()
      if (done % config.checkpoint_every_steps == 0 or done == total_steps
          or preempted):
        write_pending()
        metrics.flush()
        checkpoints.save(done, unreplicate(p_state),
                         {'data_position': done, 'evaluations': evaluations,
                          'deferred_evaluations': deferred})
      if preempted:
        logging.warning('SIGTERM: saved the checkpoint at step %d; exiting. '
                        'Run again with the same workdir to resume.', done)
        return None
    if deferred:
      logging.info('Deferred evaluation of %d parameter sets (steps %s).',
                   len(deferred), [p['step'] for p in deferred])
      scored = evaluate_deferred(method, frozen, deferred, kept, workdir,
                                 eval_sources, config)
      for evaluation in scored:
        metrics.write(evaluation['step'], {k: v for k, v in evaluation.items()
                                           if k != 'step'})
        logging.info('Epoch %d: %s', evaluation['epoch'], evaluation)
      evaluations = sorted(evaluations + scored, key=lambda e: e['step'])
      metrics.flush()
  finally:
    batches.close()
    bar.close()
    checkpoints.wait_until_finished()
    checkpoints.close()
    metrics.close()
    preemption.restore()

  results = results_summary(config, evaluations, trainable_params)
  _write_json(os.path.join(workdir, 'results.json'), results)
  if jax.process_index() == 0:
    params = unreplicate(p_state.params)
    export.save(os.path.join(workdir, 'export.npz'), params,
                export.metadata(config, step=total_steps,
                                test_accuracy=results['test_accuracy']))
  logging.info('Test accuracy %.4f after %d epochs (best of evaluations, '
               'selected on the test set: %.4f).', results['test_accuracy'],
               results['epoch'], results['best_of_evaluations']['test_accuracy'])
  return results
