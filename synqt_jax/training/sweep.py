"""A grid of SynQT and optimizer settings, trained in one pass over one feature cache.

SynQT's image path holds no trainable value and no setting of the grid: the
K/V of a training image are the same for every combination. `run` builds the
training split's feature cache once (`loop.Inputs`) and trains
every combination of the grid from it:

* Combinations that run the same program (same `token_nums`, dropout rates,
  seed, batch size and epochs: grid.group_key) are trained together, as the
  members of one `loop.train_together`, the loop every single run goes
  through: one pmapped step (`steps.train_steps`) computes all their
  gradients in one `jax.vmap` over their stacked parameters, RNG keys and
  steps, then applies each one's own optimizer (state, learning-rate
  schedule, weight decay). The learning rate, the optimizer's settings and
  SynQT's three scales (learnable parameters' initial values) differ freely
  within a group. A group larger than `max_stack` trains as several stacks;
  stacks run one after another on the same cache.
* Each combination is a run of its own under `<workdir>/<name>/`: config.json,
  checkpoints/ (its own `state.TrainState`, as a single run saves it),
  metrics.jsonl, deferred_eval/, results.json and export.npz.
* Evaluation is deferred: every combination's evaluation points are scored at
  the end with one backbone pass per split (`evaluators.score_deferred`).
* Resume: a group restores every member at the newest step all of them hold
  (checkpoints after it are deleted and trained again, bit-identically), so a
  sweep killed anywhere, even between two members' saves, resumes exactly.
* `<workdir>/results.json` holds a row per combination, the chosen one and
  the protocol that chose it; `summary.txt` and `accuracy.png` show them.

Protocols (`select_on`): 'test' is the reference's habit (the best of the
test evaluations over every combination: optimistic, labelled as chosen on
test). A validation split (`HELD_OUT`: 'val200' for VTAB-1k, 'val' for FGVC)
is the held-out protocol: train every combination on the split without it,
choose on it, retrain the chosen one on the union and report test once.
"""
import contextlib
import io
import json

from absl import logging
import jax

from synqt_jax.models import methods
from synqt_jax.training import checkpointing
from synqt_jax.training import evaluators
from synqt_jax.training import grid as grid_lib
from synqt_jax.training import host_memory
from synqt_jax.training import loop
from synqt_jax.training import train
from synqt_jax.training import workdir as workdir_lib

# Validation split -> (the split without it, the split with it).
HELD_OUT = {'val200': ('train800', 'train800val200'),
            'val': ('train', 'train+val')}
SELECT_ON = ('test', *HELD_OUT)
# A held-out sweep's directories: every combination's selection run, and the
# chosen one retrained.
SELECTION_DIR, FINAL_DIR = 'selection', 'final'
# What a sweep's workdir identity (workdir.check_identity) records its grid as.
GRID_IDENTITY = 'sweep_grid'
# Members per compiled step: XLA's compile of a step grows with the stack (8
# stacked ViT-B/16 members at T = 4 ran out of a 24 GB CPU host while
# compiling; 4 compiled); larger groups train as several stacks in turn.
MAX_STACK = 4


def member_configs(config, workdir, grid):
  """name -> (its run directory, its validated config), before anything is written."""
  grid_lib.check_grid(config, grid)
  members = {}
  for name, (_, member) in grid_lib.member_configs(config, grid).items():
    member_dir = str(workdir_lib.as_path(workdir) / name)
    members[name] = member_dir, train.validated(member, member_dir)
  return members


def train_members(config, workdir, grid, evaluation_splits=None,
                  max_stack=MAX_STACK):
  """Trains every combination of `grid` in `workdir`; name -> results, or None.

  `evaluation_splits`: the data splits scored (default: test, and val if
  configured), e.g. ('val',) while choosing on a validation split.
  `max_stack`: members per compiled step (see MAX_STACK).
  """
  config = train.validated(config, workdir)
  configs = member_configs(config, workdir, grid)
  workdir_lib.as_path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lib.locked(workdir, jax.process_index()):
    return _train_members(config, workdir, grid, configs, evaluation_splits,
                          max_stack)


def _train_members(config, workdir, grid, configs, evaluation_splits,
                   max_stack):
  """`train_members` in a workdir this process holds."""
  train.prepare_run(config, workdir)
  inputs, memory = train.prepare_inputs(config, workdir, evaluation_splits,
                                        **{GRID_IDENTITY: json.dumps(grid)})
  members = []
  for name, (member_dir, member_config) in configs.items():
    workdir_lib.as_path(member_dir).mkdir(parents=True, exist_ok=True)
    train.prepare_run(member_config, member_dir)
    members.append(train.create_member(
        name, member_config, member_dir,
        methods.from_config(member_config, inputs.method.vit),
        inputs.host_frozen, inputs.data))
  groups = {}
  for member in members:
    groups.setdefault(grid_lib.group_key(member.config, grid), []).append(member)
  groups = [stack for group in groups.values()
            for stack in grid_lib.stacks(group, max_stack)]
  logging.info('Sweep: %d combinations in %d stacked groups (%s).',
               len(members), len(groups), [len(g) for g in groups])
  preemption = checkpointing.Preemption()
  try:
    with contextlib.ExitStack() as stack:
      for i, group in enumerate(groups):
        if not loop.train_together(
            group, inputs, stack, preemption=preemption, memory=memory,
            desc=f'Group {i + 1}/{len(groups)} ({len(group)} stacked)',
            saved='every member', deferred=True):
          return None
        memory.mark(f'training group {i + 1} of {len(groups)}')
      inputs.release_cache()
      evaluators.score_deferred([m.evaluator for m in members], inputs)
      memory.mark('evaluating')
  finally:
    preemption.restore()
  train.write_json(workdir_lib.as_path(workdir) / host_memory.FILE,
                   memory.records)
  results = {}
  for member in members:
    evaluations = member.evaluator.evaluations
    if 'test_accuracy' in evaluations[-1]:
      results[member.name] = train.finish_run(
          member.config, member.workdir, evaluations, member.state.params,
          inputs.data.total_steps)
    else:
      results[member.name] = selection_summary(member.config, evaluations)
      train.write_json(
          workdir_lib.as_path(member.workdir) / workdir_lib.RESULTS_FILE,
          results[member.name])
  return results


def selection_summary(config, evaluations):
  """results.json of a member trained to be chosen on a validation split."""
  final = evaluations[-1]
  return {'task': config.data.task, 'method': config.method,
          'val_accuracy': final['val_accuracy'], 'epoch': final['epoch'],
          'protocol': (f'selection run: trained on {config.data.train_split}, '
                       f'scored on {config.data.val_split}; no test score'),
          'evaluations': evaluations}


# --- The protocols. ---

def run(config, workdir, grid=None, select_on='test', max_stack=MAX_STACK):
  """The sweep and its protocol; returns workdir/results.json's content, or None."""
  grid = grid or grid_lib.config_grid(config) or grid_lib.REFERENCE_GRID
  # Paths under {workdir} are the sweep's, shared by every phase and member.
  config = train.resolve_workdir_paths(config, workdir)
  if select_on not in SELECT_ON:
    raise grid_lib.SweepError(f'--select_on={select_on!r}; expected one of {SELECT_ON}.')
  if select_on == 'test':
    results = train_members(config, workdir, grid, max_stack=max_stack)
    if results is None:
      return None
    rows = summary_rows(config, grid, results, 'test_accuracy')
    chosen = max(rows, key=lambda r: r['best_test_accuracy'])
    summary = {
        'protocol': 'chosen on test (the reference\'s habit: the best of the '
                    'test evaluations over every combination and epoch; '
                    'optimistic, not a held-out choice)',
        'test_accuracy': chosen['best_test_accuracy'],
        'chosen': chosen['name'], 'combinations': rows}
  else:
    summary = held_out(config, workdir, grid, select_on, max_stack)
    if summary is None:
      return None
  write_summary(workdir, grid, summary)
  return summary


def held_out(config, workdir, grid, val_split, max_stack=MAX_STACK):
  """Trains on the split without `val_split`, chooses on it, retrains on both."""
  train_split, final_split = HELD_OUT[val_split]
  if config.data.source == 'folder':  # Folders hold the parts, not the union.
    final_split = f'{train_split}+{val_split}'
  selection = config.copy_and_resolve_references()
  selection.data.train_split, selection.data.val_split = train_split, val_split
  results = train_members(selection,
                          str(workdir_lib.as_path(workdir) / SELECTION_DIR),
                          grid, evaluation_splits=('val',),
                          max_stack=max_stack)
  if results is None:
    return None
  rows = summary_rows(config, grid, results, 'val_accuracy')
  chosen = max(rows, key=lambda r: r['val_accuracy'])
  final = grid_lib.member_configs(config, grid)[chosen['name']][1]
  final.data.train_split, final.data.val_split = final_split, None
  logging.info('Chosen on %s: %s (%.4f); retraining on %s.', val_split,
               chosen['name'], chosen['val_accuracy'], final_split)
  final_dir = str(workdir_lib.as_path(workdir) / FINAL_DIR)
  results = train.train_and_evaluate(final, final_dir)
  if results is None:
    return None
  protocol = (f'held out: each combination trained on {train_split} and '
              f'scored on {val_split}; the chosen one (best final-epoch '
              f'{val_split} accuracy) retrained on {final_split}; test '
              'scored once')
  results['protocol'] = protocol
  train.write_json(workdir_lib.as_path(final_dir) / workdir_lib.RESULTS_FILE,
                   results)
  return {'protocol': protocol, 'test_accuracy': results['test_accuracy'],
          'chosen': chosen['name'], 'combinations': rows}


def summary_rows(config, grid, results, key):
  """A row per combination: its fields, final `key` score (and best test)."""
  rows = []
  for name, (fields, _) in grid_lib.member_configs(config, grid).items():
    r = {'name': name, 'fields': fields, key: results[name][key]}
    if key == 'test_accuracy':
      r['best_test_accuracy'] = max(e['test_accuracy']
                                    for e in results[name]['evaluations'])
    rows.append(r)
  return rows


def write_summary(workdir, grid, summary):
  """results.json, summary.txt (a table) and accuracy.png of the sweep."""
  train.write_json(workdir_lib.as_path(workdir) / workdir_lib.RESULTS_FILE,
                   summary)
  if jax.process_index() != 0:
    return
  key = 'val_accuracy' if 'val_accuracy' in summary['combinations'][0] else (
      'test_accuracy')
  lines = [' '.join(f'{f:>18}' for f in (*grid, key)) + '  chosen']
  for r in summary['combinations']:
    lines.append(' '.join(f'{r["fields"][f]!s:>18}' for f in grid) +
                 f' {r[key]:18.4f}' + ('  *' if r['name'] == summary['chosen']
                                       else ''))
  lines.append(f'{summary["protocol"]}: test accuracy '
               f'{summary["test_accuracy"]:.4f} ({summary["chosen"]}).')
  table = '\n'.join(lines)
  (workdir_lib.as_path(workdir) / 'summary.txt').write_text(table + '\n')
  logging.info('Sweep summary:\n%s', table)
  plot_accuracies(workdir_lib.as_path(workdir) / 'accuracy.png', summary, key)


def plot_accuracies(path, summary, key):
  """A bar per combination, the chosen one highlighted, as a PNG at `path`
  (an epath.Path: a bucket's too)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = summary['combinations']
  fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(rows)), 3.5))
  ax.bar(range(len(rows)), [r[key] for r in rows],
         color=['C1' if r['name'] == summary['chosen'] else 'C0' for r in rows])
  ax.set_xticks(range(len(rows)), [r['name'] for r in rows], rotation=90,
                fontsize=6)
  ax.set_ylabel(key.replace('_', ' '))
  ax.set_title('Accuracy per combination (chosen in orange)')
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=120)
  plt.close(fig)
  path.write_bytes(png.getvalue())
