"""Training speed of SynQT against linear probing, LoRA and full fine-tuning.

  python -m benchmarks.speed --json benchmarks/results/speed.json [--batch_size 64]

For ViT-B/16 at 224 (float32), per method: training images/s of the compiled train
step at one batch size, the step's FLOPs from XLA's cost analysis, and the
achieved fraction of the machine's matrix-multiply peak, measured in the same run
as the time of a large float32 matmul. Ratios are to full fine-tuning.
"""
import dataclasses
import itertools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import common
from synqt_jax.models import methods

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per step.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per method, after one warm-up.')
_METHODS = flags.DEFINE_string('methods', ','.join(methods.METHODS), 'Comma-separated.')
_MATMUL = flags.DEFINE_integer('matmul_size', 4096, 'Side of the peak-FLOP/s matmul.')
_JSON = flags.DEFINE_string('json', None, 'Write the table here.')


@dataclasses.dataclass
class Speed:
  method: str
  batch_size: int
  seconds_per_step: float
  step_flops: float

  @property
  def images_per_second(self):
    return self.batch_size / self.seconds_per_step

  @property
  def flops_per_second(self):
    return self.step_flops / self.seconds_per_step


def timed(fn, steps):
  """Median wall time of `fn()` over `steps` runs (blocking on its result)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median_high(times)


def matmul_peak(size, steps=5):
  """FLOP/s of a float32 (size x size) @ (size x size) matmul on the default device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  return 2 * size ** 3 / timed(lambda: matmul(a), steps)


def step_flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def measure(name, vit, batch_size, steps):
  compiled, (state, frozen, batch) = common.compiled_step(name, vit, batch_size,
                                                          abstract=False)
  times = common.step_seconds(compiled, state, frozen, itertools.repeat(batch),
                              steps)
  return Speed(name, batch_size, statistics.median_high(times),
               step_flops(compiled))


def main(argv):
  del argv
  peak = matmul_peak(_MATMUL.value)
  rows = []
  for name in _METHODS.value.split(','):
    rows.append(measure(name, common.VIT_B16, _BATCH_SIZE.value, _STEPS.value))
    print(f'  {name}: {rows[-1].images_per_second:.2f} images/s', flush=True)
  full = {r.batch_size: r for r in rows if r.method == 'full'}
  print(common.backend_description(),
        f'matmul peak {peak / 1e9:.1f} GFLOP/s (float32, {_MATMUL.value}^2)')
  print(f'{"method":>8} {"batch":>5} {"s/step":>8} {"images/s":>9} {"vs full":>8} '
        f'{"GFLOP/step":>11} {"of peak":>8}')
  for r in rows:
    ratio = r.images_per_second / full[r.batch_size].images_per_second if full else None
    print(f'{r.method:>8} {r.batch_size:>5} {r.seconds_per_step:>8.3f} '
          f'{r.images_per_second:>9.2f} {"" if ratio is None else f"{ratio:.2f}x":>8} '
          f'{r.step_flops / 1e9:>11.1f} {r.flops_per_second / peak:>8.1%}')
  if _JSON.value:
    common.write_json(_JSON.value, {
        'setup': {**common.backend_description(), 'model': 'ViT-B/16', 'image_size': 224,
                  'dtype': 'float32', 'matmul_peak_flops_per_second': peak},
        'rows': [dict(dataclasses.asdict(r), images_per_second=r.images_per_second,
                      fraction_of_matmul_peak=r.flops_per_second / peak,
                      speed_vs_full=(r.images_per_second / full[r.batch_size].images_per_second
                                     if full else None))
                 for r in rows]})


if __name__ == '__main__':
  app.run(main)
