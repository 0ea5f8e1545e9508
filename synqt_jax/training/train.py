"""Trains a tuning method on one task and reports its test accuracy.

`train_and_evaluate(config, workdir)` is the whole run (launch.py calls it),
a short sequence of steps: prepare the workdir, load the data and the
backbone (`prepare_inputs`, shared with sweeps), build the method's train
state, then train it as the one member of `loop.train_together` and score
what was deferred. Everything random is a function of (seed, step), and the
workdir's checkpoints hold the whole training state, so running again on the
same workdir resumes exactly where the last checkpoint left off.

With `train.feature_cache` (SynQT, linear) the training split's image-path K/V
(the linear probe's: its pooled features) are computed once
(`feature_cache.build`, kept in <workdir>/feature_cache/ and reused while their
fingerprint matches) and every step runs only the query path (the head) on
cached batches; the batches depend only on (seed, step), as online.
With `train.deferred_eval` (SynQT, linear) the trainable parameters of each
evaluation point are kept and scored together at the end with one backbone
pass per evaluation split (evaluators.py): same accuracies, same
results.json.

Workdir contents: config.json, checkpoints/ (orbax), metrics.jsonl and
TensorBoard events, results.json and export.npz (the trained task parameters)
when done; feature_cache/ and deferred_eval/ when those are on.
"""
import contextlib
import dataclasses

from absl import logging
import jax

from synqt_jax.config import fields as config_fields
from synqt_jax.config import validation as config_validation
from synqt_jax.data import batching
from synqt_jax.data import data_config
from synqt_jax.data import preprocess
from synqt_jax.data import sources
from synqt_jax.models import methods
from synqt_jax.training import checkpointing
from synqt_jax.training import evaluators
from synqt_jax.training import feature_cache
from synqt_jax.training import host_memory
from synqt_jax.training import loop
from synqt_jax.training import nonfinite
from synqt_jax.training import optimizer
from synqt_jax.training import state as state_lib
from synqt_jax.training import workdir as workdir_lib
from synqt_jax.weights import export


# --- Configuration, data and backbone. ---

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


def prepare_inputs(config, workdir, evaluation_splits=None, **identity):
  """(Inputs, Phases): the data and the frozen backbone, loaded and checked.

  `evaluation_splits`: the data splits scored (default: test, and val if
  configured). `identity`: what else the workdir's identity records (a
  sweep's grid); the backbone's digest is always recorded.
  """
  memory = host_memory.Phases()
  data = Data.load(config)
  if evaluation_splits is not None:
    data = dataclasses.replace(data, evaluation={
        k: v for k, v in data.evaluation.items() if k in evaluation_splits})
  memory.mark('loading the data')
  method, frozen = methods.create_method(config)
  memory.mark('loading the backbone')
  nonfinite.check_backbone(frozen['backbone'], config.backbone.source)
  digest = feature_cache.backbone_digest(frozen)
  workdir_lib.check_identity(workdir, config, backbone_digest=digest,
                             **identity)
  return loop.Inputs(config, workdir, method, frozen, data, digest), memory


def create_member(name, config, workdir, method, frozen, data):
  """A `loop.Member` with its initial state (host numpy arrays)."""
  schedule = optimizer.learning_rate_schedule(config.optim,
                                              data.steps_per_epoch)
  state = state_lib.create_train_state(
      method, frozen, optimizer.create(config.optim, schedule), config.seed,
      config.data.image_size)
  return loop.Member(name, workdir, config, schedule, state)


# --- The run. ---

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
  inputs, memory = prepare_inputs(config, workdir)
  member = create_member('run', config, workdir, inputs.method,
                         inputs.host_frozen, inputs.data)
  # What the trainable state took over (full fine-tuning's backbone) is not
  # also kept frozen: the devices hold it once.
  inputs.drop_frozen(member.state.params)
  log_run(config, inputs.data, member.state)
  preemption = checkpointing.Preemption()
  try:
    with contextlib.ExitStack() as stack:
      if not loop.train_together([member], inputs, stack,
                                 preemption=preemption, memory=memory):
        return None
      inputs.release_cache()
      memory.mark('training')
      evaluators.score_deferred([member.evaluator], inputs)
      memory.mark('evaluating' + (' (deferred)' if config.train.deferred_eval
                                  else ''))
  finally:
    preemption.restore()
  write_json(workdir_lib.as_path(workdir) / host_memory.FILE, memory.records)
  return finish_run(config, workdir, member.evaluator.evaluations,
                    member.state.params, inputs.data.total_steps)


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
  logging.info('Task %s: %d training images, %d steps of %d (%d epochs). '
               'Trainable parameters: %d (the reference\'s unused pre_norm and '
               'combine weight vector are left out). Optimizer: %s.',
               data.train.name, len(data.train), data.total_steps,
               config.optim.batch_size, config.optim.epochs,
               methods.trainable_count(state.params),
               optimizer.describe(config.optim))
  logging.info('Devices: %d in all, %d on this host (process %d of %d): %s.',
               jax.device_count(), jax.local_device_count(),
               jax.process_index(), jax.process_count(), jax.local_devices())


def finish_run(config, workdir, evaluations, params, total_steps):
  """Writes results.json and export.npz (the host `params`); returns the results."""
  results = results_summary(config, evaluations,
                            methods.trainable_count(params))
  write_json(workdir_lib.as_path(workdir) / workdir_lib.RESULTS_FILE, results)
  if jax.process_index() == 0:
    export.save(workdir_lib.as_path(workdir) / export.FILE, params,
                export.metadata(config, step=total_steps,
                                test_accuracy=results['test_accuracy']))
  best = ('' if len(evaluations) == 1 else ' (best of evaluations, selected on '
          f'the test set: {results["best_of_evaluations"]["test_accuracy"]:.4f})')
  logging.info('Test accuracy %.4f after %d epochs%s.', results['test_accuracy'],
               results['epoch'], best)
  return results
