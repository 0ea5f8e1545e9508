"""Evaluators: score the trainable parameters at each evaluation point.

The points are every `eval_every_epochs` epochs and the last step; an
evaluation is {'step', 'epoch', '<split>_accuracy', ...} for every
evaluation split. `ImmediateEvaluator` scores each point as it comes;
`DeferredEvaluator` (`train.deferred_eval`) keeps the point's parameters
(<workdir>/deferred_eval/*.npz, listed in the checkpoint metadata) and
`score_deferred` scores every kept point of every member of a run with one
backbone pass per split (deferred_eval.py): same accuracies, same
results.json.
"""
import abc
import functools

from absl import logging
import jax
import numpy as np

from synqt_jax.data import batching
from synqt_jax.training import cadence
from synqt_jax.training import deferred_eval
from synqt_jax.training import devices
from synqt_jax.training import steps
from synqt_jax.training import workdir as workdir_lib
from synqt_jax.weights import export


class Evaluator(abc.ABC):
  """One member's evaluations; points kept for a deferred evaluation (also
  those of a resumed run's earlier part) are scored by `score_deferred`.

  `inputs.p_frozen` (training/loop.py `Inputs`) is read when a point is
  scored: the backbone is placed on the devices after the step compiles.
  """

  def __init__(self, config, workdir, method, inputs, log, history):
    self._config, self._workdir = config, workdir
    self.method, self._inputs = method, inputs
    self._data, self._log = inputs.data, log
    self.evaluations = list(history.get('evaluations', []))
    self.deferred = list(history.get('deferred_evaluations', []))
    self._kept = {}  # step -> trainable parameters (host numpy) of this run.

  def is_time(self, step) -> bool:
    return cadence.itstime(
        step, self._config.eval_every_epochs * self._data.steps_per_epoch,
        self._data.total_steps)

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
    self._p_eval_step = jax.pmap(functools.partial(steps.eval_step, self.method),
                                 axis_name=devices.AXIS)

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
      counts = devices.unreplicate(
          self._p_eval_step(p_params, self._inputs.p_frozen, batch))
      correct += int(counts['correct'])
      count += int(counts['count'])
    return correct / count


class DeferredEvaluator(Evaluator):
  """Keeps the parameters of each point for `score_deferred`."""

  def __call__(self, step, p_params):
    point = self._point(step)
    # A copy: the next step donates the replicated buffers.
    self._kept[step] = jax.tree.map(np.array, devices.unreplicate(p_params))
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


def create_evaluator(config, workdir, method, inputs, log, history,
                     deferred=None) -> Evaluator:
  """The evaluator `deferred` chooses (None: `config.train.deferred_eval`)."""
  if deferred is None:
    deferred = config.train.deferred_eval
  kind = DeferredEvaluator if deferred else ImmediateEvaluator
  return kind(config, workdir, method, inputs, log, history)


def score_deferred(evaluators, inputs) -> None:
  """Scores every deferred point of `evaluators`: one backbone pass per split."""
  points = [(e, p) for e in evaluators for p in e.deferred_parameters()]
  if not points:
    return
  logging.info('Deferred evaluation of %d parameter sets (steps %s).',
               len(points), [p['step'] for e in evaluators for p in e.deferred])
  config = inputs.config
  accuracies = {}  # split -> one accuracy per deferred point.
  for split, source in inputs.data.evaluation.items():
    accuracies[split] = deferred_eval.evaluate_each(
        [(e.method, p) for e, p in points], inputs.p_frozen, source,
        config.eval_batch_size,
        normalization=config.data.normalization).accuracies
  start = 0
  for evaluator in evaluators:
    count = len(evaluator.deferred)
    evaluator.record_deferred(
        {split: a[start:start + count] for split, a in accuracies.items()})
    start += count
