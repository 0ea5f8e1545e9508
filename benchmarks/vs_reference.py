"""This project's train step beside the PyTorch reference's: memory, speed, compile time.

  python -m benchmarks.vs_reference --reference /path/to/SynQT \
      --json benchmarks/results/vs_reference.json [--batch_sizes 16,64]

ViT-B/16 at 224 with random weights, T = 4, train mode, AdamW, 100 classes, on
this machine's CPU. Every point is a fresh process, the implementations
alternating at each batch size: the reference (benchmarks/reference_step.py
importing the reference's own synqt.py, from a fetched copy of the public
repository GitHub taolinzhang/SynQT), then this project's `steps.train_step`
(the trainer's pmapped step) in each image-path memory mode, and keep_kv
with bfloat16 K/V (synqt.kv_dtype) or with the frozen backbone held in
bfloat16 (backbone_dtype). Per point:
images per second (median step after a warm-up step), seconds to compile,
and the peak resident memory of the whole process (ru_maxrss). A last run
repeats keep_kv at the first batch size with the persistent compilation
cache the first one filled: it compiles nothing. Last, the compute bound:
the image path's matmuls (`common.image_path_flops`) at JAX's best float32
matmul throughput on this machine, measured in the same run, give the most
img/s this project's step can reach, and what that is against the reference.

--reference: the reference's checkout (or its synqt.py). Its train step runs
in a venv made at <checkout>/venv on first use (torch 2.x CPU, timm 0.4.12 as
the reference used, and a stand-in for torchvision, which timm 0.4.12 imports
and the train step never calls), or in --reference_python. Without a usable
reference only this project is measured, and the table says why.

--compile_only: only this project's first compile of each point (on the
parameters' shapes, in a fresh process without the persistent cache) and XLA's
memory analysis of the compiled step; nothing runs.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common
from configs import common as common_config
from synqt_jax.testing import random_vit
from synqt_jax.training import compilation_cache
from synqt_jax.training import devices
from synqt_jax.training import host_memory

_REFERENCE = flags.DEFINE_string(
    'reference', None, "The reference's checkout (holding synqt.py) or its synqt.py.")
_REFERENCE_PYTHON = flags.DEFINE_string(
    'reference_python', None,
    'A Python with torch 2.x and timm 0.4.12; default: <checkout>/venv, made if absent.')
_BATCH_SIZES = flags.DEFINE_string('batch_sizes', '16,64', 'Comma-separated.')
_TOKENS = flags.DEFINE_integer('tokens', 4, 'SynQT queries per layer (T).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per point.')
_JSON = flags.DEFINE_string('json', None, 'Write the table here.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only compile each of our points (see the docstring).')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: BATCH:MEMORY, one point.')
_CACHE = flags.DEFINE_string('cache', None, 'Internal: the compilation cache.')

# Our points: name -> config fields.
VARIANTS = {'keep_kv': {'synqt.image_path_memory': 'keep_kv'},
            'keep_kv_bf16kv': {'synqt.image_path_memory': 'keep_kv',
                               'synqt.kv_dtype': 'bfloat16'},
            'keep_kv_bf16backbone': {'synqt.image_path_memory': 'keep_kv',
                                     'backbone_dtype': 'bfloat16'},
            'recompute': {'synqt.image_path_memory': 'recompute'}}
REFERENCE_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'reference_step.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# timm 0.4.12 imports torchvision's transforms when it is imported; the train
# step uses none of them.
TORCHVISION_STAND_IN = '''"""Stand-in for torchvision: any attribute is a placeholder."""
import sys
import types


class Placeholder:
  def __init__(self, *args, **kwargs):
    pass


def __getattr__(name):
  if name.startswith('__'):
    raise AttributeError(name)
  return Placeholder


transforms = types.ModuleType('torchvision.transforms')
transforms.__getattr__ = __getattr__
transforms.functional = types.ModuleType('torchvision.transforms.functional')
transforms.functional.__getattr__ = __getattr__
sys.modules.update({'torchvision.transforms': transforms,
                    'torchvision.transforms.functional': transforms.functional})
'''


def our_point(batch_size, variant, tokens, steps, cache):
  """One point of this project, in this (fresh) process, in the trainer's order.

  As `train.run`: the state is made (its op-by-op initialisation's
  executables dropped), the step compiled with the trainer's options, its
  compile memory handed back, then steps run. `--compile_only` compiles on
  the shapes alone.
  """
  compilation_cache.enable(cache or None)  # '': no persistent cache.
  compiles = compilation_cache.CompileCount()
  config = common_config.get_config()
  config.synqt.token_nums = tokens
  for field, value in VARIANTS[variant].items():
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
  inputs = common.method_inputs('synqt', common.VIT_B16, batch_size,
                                abstract=_COMPILE_ONLY.value, config=config)
  devices.release_executables()  # As state_lib.create_train_state.
  rss_inputs = peak_rss_mb()
  start = time.perf_counter()
  compiled = common.compile_step(inputs)
  compile_s = time.perf_counter() - start
  rss_compiled = peak_rss_mb()
  devices.release_executables()  # As train.run after compiling.
  analysis = compiled.memory_analysis()
  point = {'implementation': f'synqt_jax {variant}', 'batch': batch_size,
           'tokens': tokens, 'compile_s': compile_s,
           'programs_compiled': compiles.compiled,
           'programs_from_cache': compiles.hits,
           'xla_argument_mb': analysis.argument_size_in_bytes / 2**20,
           'xla_temp_mb': analysis.temp_size_in_bytes / 2**20}
  if _COMPILE_ONLY.value:
    return point
  state, frozen, batch = inputs
  times = common.step_seconds(compiled, state, frozen, itertools.repeat(batch),
                              steps)
  step = sorted(times)[len(times) // 2]
  return {**point, 'step_s': step, 'img_per_s': batch_size / step,
          'peak_rss_mb': peak_rss_mb(), 'peak_rss_before_compile_mb': rss_inputs,
          'peak_rss_after_compile_mb': rss_compiled}


def peak_rss_mb():
  return host_memory.peak_bytes() / 2 ** 20


def run_point(command, env=None):
  """The JSON line a fresh process prints, or {'error': why}."""
  out = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                       env=env)
  if out.returncode:
    return {'error': f'exit {out.returncode}: {out.stderr.strip()[-600:]}'}
  return json.loads(out.stdout.strip().splitlines()[-1])


def ours(batch_size, variant, cache):
  point = run_point([sys.executable, '-m', 'benchmarks.vs_reference',
                     f'--worker={batch_size}:{variant}', f'--cache={cache or ""}',
                     f'--tokens={_TOKENS.value}', f'--steps={_STEPS.value}',
                     f'--compile_only={_COMPILE_ONLY.value}'])
  return {'implementation': f'synqt_jax {variant}', 'batch': batch_size, **point}


def reference_setup(directory):
  """(python, synqt.py, PYTHONPATH) of the reference, or (None, None, why not)."""
  if directory is None:
    return None, None, 'no --reference given'
  synqt_py = (directory if os.path.isfile(directory)
              else os.path.join(directory, 'synqt.py'))
  if not os.path.isfile(synqt_py):
    return None, None, f'{synqt_py} does not exist'
  home = os.path.dirname(os.path.abspath(synqt_py))
  python = _REFERENCE_PYTHON.value or os.path.join(home, 'venv', 'bin', 'python')
  if not os.path.exists(python):
    try:
      make_reference_venv(os.path.dirname(os.path.dirname(python)))
    except (OSError, subprocess.CalledProcessError) as e:
      return None, None, f'could not make the reference venv ({e})'
  stand_in = os.path.join(home, 'torchvision_stand_in')
  os.makedirs(os.path.join(stand_in, 'torchvision'), exist_ok=True)
  with open(os.path.join(stand_in, 'torchvision', '__init__.py'), 'w') as f:
    f.write(TORCHVISION_STAND_IN)
  return python, synqt_py, stand_in


def make_reference_venv(venv):
  print(f'Making the reference venv {venv} (torch 2.x CPU, timm 0.4.12)...',
        flush=True)
  subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
  pip = [os.path.join(venv, 'bin', 'python'), '-m', 'pip', 'install', '-q']
  subprocess.run(pip + ['torch>=2,<3', '--index-url',
                        'https://download.pytorch.org/whl/cpu'], check=True)
  subprocess.run(pip + ['--no-deps', 'timm==0.4.12'], check=True)
  # synqt.py imports IPython (embed) and timm imports PIL at import time.
  subprocess.run(pip + ['numpy', 'pillow', 'ipython'], check=True)


def reference(python, synqt_py, stand_in, backbone, batch_size):
  env = {**os.environ, 'PYTHONPATH': stand_in}
  point = run_point([python, REFERENCE_STEP, synqt_py, backbone,
                     f'--batch={batch_size}', f'--tokens={_TOKENS.value}',
                     f'--steps={_STEPS.value}', f'--threads={os.cpu_count()}'],
                    env)
  return {'implementation': 'reference', 'batch': batch_size, **point}


def compute_bound():
  """The most img/s this project's step can reach on this machine: the image
  path's matmuls alone, at JAX's best float32 matmul throughput here, measured
  now (`common.matmul_gflops`)."""
  gflops = common.matmul_gflops(common.VIT_B16)
  gflop = common.image_path_flops(common.VIT_B16) / 1e9
  return {'matmul_gflops': gflops, 'image_path_gflop_per_image': gflop,
          'img_per_s_at_most': gflops / gflop}


def with_ratios(points, bound):
  """Each point with its share of the compute bound, and each of ours with
  its ratios to the reference at its batch size."""
  for point in points:
    if 'error' not in point:
      point['img_per_s_vs_bound'] = point['img_per_s'] / bound['img_per_s_at_most']
    base = [p for p in points if p['implementation'] == 'reference'
            and p['batch'] == point['batch'] and 'error' not in p]
    if base and 'error' not in point and point is not base[0]:
      point['peak_rss_vs_reference'] = point['peak_rss_mb'] / base[0]['peak_rss_mb']
      point['img_per_s_vs_reference'] = point['img_per_s'] / base[0]['img_per_s']
  return points


def print_bound(bound, points):
  """One line: the compute bound, and what it allows against the reference."""
  allowed = ', '.join(
      f'{bound["img_per_s_at_most"] / p["img_per_s"]:.2f}x the reference at batch '
      f'{p["batch"]}'
      for p in points if p['implementation'] == 'reference' and 'error' not in p)
  print(f'Compute bound: {bound["image_path_gflop_per_image"]:.1f} GFLOP an image '
        f'at {bound["matmul_gflops"]:.0f} GFLOP/s (JAX float32 matmul, measured now): '
        f'at most {bound["img_per_s_at_most"]:.2f} img/s'
        + (f': {allowed}.' if allowed else '.'))


def print_table(points):
  print(f'{"implementation":>20} {"batch":>5} {"img/s":>7} {"peak RSS MB":>11} '
        f'{"compile s":>9} {"RSS ratio":>9} {"speed ratio":>11}')
  for p in points:
    if 'error' in p:
      print(f'{p["implementation"]:>20} {p["batch"]:>5} {p["error"][:200]}')
      continue
    ratio = lambda k: f'{p[k]:.2f}' if k in p else ''
    compile_s = '' if p.get('compile_s') is None else f'{p["compile_s"]:.1f}'
    print(f'{p["implementation"]:>20} {p["batch"]:>5} {p["img_per_s"]:>7.2f} '
          f'{p["peak_rss_mb"]:>11.0f} {compile_s:>9} '
          f'{ratio("peak_rss_vs_reference"):>9} '
          f'{ratio("img_per_s_vs_reference"):>11}')


def print_compile_table(points):
  print(f'{"implementation":>20} {"batch":>5} {"compile s":>9} {"XLA temp MB":>11}')
  for p in points:
    print(f'{p["implementation"]:>20} {p["batch"]:>5} '
          + (p['error'][:200] if 'error' in p else
             f'{p["compile_s"]:>9.1f} {p["xla_temp_mb"]:>11.0f}'))


def compile_only():
  """`--compile_only`: each point's first compile, nothing cached, nothing run."""
  points = [ours(batch_size, variant, None)
            for batch_size in common.parse_ints(_BATCH_SIZES.value)
            for variant in VARIANTS]
  if _JSON.value:
    common.write_json(_JSON.value, {'setup': common.backend_description(),
                                    'points': points})
  print_compile_table(points)


def main(argv):
  del argv
  if _WORKER.value:
    batch_size, variant = _WORKER.value.split(':')
    print(json.dumps(our_point(int(batch_size), variant, _TOKENS.value,
                               _STEPS.value, _CACHE.value)))
    return
  if _COMPILE_ONLY.value:
    compile_only()
    return
  python, synqt_py, stand_in = reference_setup(_REFERENCE.value)
  if python is None:
    print(f'Reference not measured: {stand_in}. Measuring this project only.')
  batch_sizes = common.parse_ints(_BATCH_SIZES.value)
  setup = {**common.backend_description(), 'model': 'ViT-B/16',
           'image_size': 224, 'tokens': _TOKENS.value, 'steps': _STEPS.value,
           'cpu_count': os.cpu_count(),
           'reference': ('measured' if python is not None
                         else f'not measured: {stand_in}'),
           'compute_bound': compute_bound()}
  points = []

  def add(point):
    """Prints the point; the JSON so far is written after each (a long run)."""
    points.append(point)
    with_ratios(points, setup['compute_bound'])
    print_table(points[-1:])
    if _JSON.value:
      common.write_json(_JSON.value, {'setup': setup, 'points': points})

  with tempfile.TemporaryDirectory() as scratch:
    cache = os.path.join(scratch, 'xla')
    backbone = os.path.join(scratch, 'vit_b16.npz')
    if python is not None:
      random_vit.write(backbone)  # Official layout, as timm loads it.
    for batch_size in batch_sizes:
      if python is not None:
        add(reference(python, synqt_py, stand_in, backbone, batch_size))
      for variant in VARIANTS:
        add(ours(batch_size, variant, cache))
    warm = ours(batch_sizes[0], next(iter(VARIANTS)), cache)
    warm['implementation'] += ' (warm cache)'
    add(warm)
  print(setup)
  print_table(points)
  print_bound(setup['compute_bound'], points)


if __name__ == '__main__':
  app.run(main)
