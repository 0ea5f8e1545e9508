"""Training-step memory of SynQT against linear probing, LoRA and full fine-tuning.

  python -m benchmarks.memory --json benchmarks/results/memory.json \
      --plot benchmarks/results/memory.png [--batch_sizes 1,8,32,64,128] [--measure]

For ViT-B/16 at 224 (float32) and each batch size, per method: XLA's analysis of
the compiled train step (arguments, outputs, temporaries; `memory_analysis()`),
and with --measure the peak measured on the running backend by a fresh process
per point (device `peak_bytes_in_use` on GPU/TPU; peak resident memory on CPU),
which compiles the step once for both figures and runs it once. A point whose
XLA total exceeds the memory the backend has free is not run; the table says so.
Ratios are to full fine-tuning at the same batch size.
"""
import dataclasses
import json
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags
import jax
import matplotlib.pyplot as plt

from benchmarks import common
from synqt_jax.models import methods

GIB = 2 ** 30

_BATCH_SIZES = flags.DEFINE_string('batch_sizes', '1,8,32,64,128', 'Comma-separated.')
_METHODS = flags.DEFINE_string('methods', ','.join(methods.METHODS), 'Comma-separated.')
_MEASURE = flags.DEFINE_bool('measure', False,
                             'Also measure the peak of a real step, a process per point.')
_MEASURE_ONE = flags.DEFINE_string('measure_one', None,
                                   'Internal: METHOD:BATCH, run in a fresh process.')
_JSON = flags.DEFINE_string('json', None, 'Write the table here.')
_PLOT = flags.DEFINE_string('plot', None, 'Write the PNG plot here.')


@dataclasses.dataclass
class Point:
  method: str
  batch_size: int
  trainable: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  measured_peak_bytes: int = None  # From a real step, with --measure.
  measured_note: str = None  # Why a point was not measured.

  @property
  def total_bytes(self):
    """What the step needs at once: inputs, outputs (less donated reuse), temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def analyse(name, vit, batch_size, step=None):
  """XLA's figures for the compiled `step` (compiled from shapes when None)."""
  compiled, (state, _, _) = step or common.compiled_step(name, vit, batch_size)
  m = compiled.memory_analysis()
  return Point(name, batch_size, methods.trainable_count(state.params),
               m.argument_size_in_bytes,
               m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)


def free_bytes():
  """Memory the backend can still give: device limit less use, or the host's MemAvailable."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return None


def measured_point(name, vit, batch_size):
  """The point, with the peak of one real step, in this (fresh) process."""
  step = common.compiled_step(name, vit, batch_size, abstract=False)
  point = analyse(name, vit, batch_size, step)
  compiled, (state, frozen, batch) = step
  free = free_bytes()
  if free is not None and point.total_bytes > free:
    point.measured_note = (f'not run: XLA needs {point.total_bytes / GIB:.1f} GiB, '
                           f'{free / GIB:.1f} GiB free')
    return point
  jax.block_until_ready(compiled(state, frozen, batch))
  stats = jax.local_devices()[0].memory_stats() or {}
  point.measured_peak_bytes = int(stats.get(
      'peak_bytes_in_use',  # Linux reports ru_maxrss in KiB.
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
  return point


def measure_in_fresh_process(name, batch_size):
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.memory', f'--measure_one={name}:{batch_size}'],
      capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if out.returncode:
    raise RuntimeError(f'Measuring {name} at batch {batch_size} failed (exit '
                       f'{out.returncode}; -9 is usually the out-of-memory killer):\n'
                       f'{out.stderr[-2000:]}')
  return Point(**json.loads(out.stdout.strip().splitlines()[-1]))


def compiled_memory_table(vit, batch_sizes, names=methods.METHODS, measure=False):
  """Points for every method and batch size (XLA analysis; measured peak if asked)."""
  table = []
  for batch_size in batch_sizes:
    for name in names:
      point = (measure_in_fresh_process(name, batch_size) if measure
               else analyse(name, vit, batch_size))
      table.append(point)
      measured = (f', measured {point.measured_peak_bytes / GIB:.3f}'
                  if point.measured_peak_bytes else '')
      print(f'  {name:>6} batch {batch_size:>3}: {point.total_bytes / GIB:7.3f} GiB '
            f'(temporaries {point.temp_bytes / GIB:.3f}{measured})'
            f'{" " + point.measured_note if point.measured_note else ""}', flush=True)
  return table


def ratio_to_full(table, point, field):
  full = [p for p in table if p.method == 'full' and p.batch_size == point.batch_size]
  value = getattr(point, field)
  if not full or value is None or not getattr(full[0], field):
    return None
  return value / getattr(full[0], field)


def print_table(table):
  print(f'{"method":>8} {"batch":>5} {"trainable":>11} {"args GiB":>9} {"out GiB":>8} '
        f'{"temp GiB":>9} {"total GiB":>9} {"vs full":>7} {"measured GiB":>12}')
  for p in table:
    ratio = ratio_to_full(table, p, 'total_bytes')
    measured = ('' if p.measured_peak_bytes is None
                else f'{p.measured_peak_bytes / GIB:.3f}')
    measured = measured or ('not run' if p.measured_note else '')
    print(f'{p.method:>8} {p.batch_size:>5} {p.trainable:>11,} '
          f'{p.argument_bytes / GIB:>9.3f} {p.output_bytes / GIB:>8.3f} '
          f'{p.temp_bytes / GIB:>9.3f} {p.total_bytes / GIB:>9.3f} '
          f'{"" if ratio is None else f"{ratio:.3f}":>7} {measured:>12}')


def plot(table):
  """Step memory against batch size, one line per method (XLA's total)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in methods.METHODS:
    points = sorted((p.batch_size, p.total_bytes / GIB) for p in table if p.method == name)
    if points:
      ax.plot(*zip(*points), marker='o', label=name)
  ax.set_xlabel('batch size')
  ax.set_ylabel('train-step memory (GiB, XLA)')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  ax.set_title('ViT train step: arguments + outputs + temporaries')
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  vit = common.VIT_B16
  if _MEASURE_ONE.value:
    name, batch_size = _MEASURE_ONE.value.split(':')
    print(json.dumps(dataclasses.asdict(measured_point(name, vit, int(batch_size)))))
    return
  table = compiled_memory_table(vit, common.parse_ints(_BATCH_SIZES.value),
                                _METHODS.value.split(','), _MEASURE.value)
  print(common.backend_description())
  print_table(table)
  if _JSON.value:
    common.write_json(_JSON.value, {
        'setup': {**common.backend_description(), 'model': 'ViT-B/16', 'image_size': 224,
                  'dtype': 'float32', 'num_classes': common.NUM_CLASSES},
        'points': [dict(dataclasses.asdict(p), total_bytes=p.total_bytes,
                        total_vs_full=ratio_to_full(table, p, 'total_bytes'),
                        measured_vs_full=ratio_to_full(table, p, 'measured_peak_bytes'))
                   for p in table]})
  if _PLOT.value:
    plot(table).savefig(_PLOT.value, dpi=120)


if __name__ == '__main__':
  app.run(main)
