"""What the feature cache, deferred evaluation and memory modes buy (issue 6).

On the machine it runs on, for ViT-B/16 (random weights,
`common.random_backbone`) at 224, batch 64 and T query tokens per layer, it
measures:
  - the trainer's step (`steps.train_step` under pmap) online (image path +
    query path) and cached (query path on K/V read from a host cache through
    `FeatureCache.batches`, the gather of each batch included);
  - the cache build (`feature_cache.build`, warm) on a subset;
  - an evaluation batch's backbone pass (`image_kv`) and query-path scoring
    (`apply_kv`): a separate evaluation costs both per image, deferred
    evaluation one backbone pass plus a scoring per evaluation point;
  - the compiled train step's temporary memory in each image-path memory mode.
and projects the VTAB-1k recipe: 1000 training images (16 steps an epoch),
50 epochs, 5 evaluations on a 10,000-image test set. Prints a table, writes
JSON. Runs in about 15-30 minutes on 2 CPU cores.

  python -m benchmarks.feature_cache --json benchmarks/results/feature_cache.json \
      [--tokens 1,4,16] [--online-steps 2] [--cached-steps 4] [--memory-tokens 4]
"""
import dataclasses
import itertools
import json
import os
import platform
import time

import flax.jax_utils
import jax
import numpy as np

from benchmarks import common
from synqt_jax.data import batching
from synqt_jax.data import sources
from synqt_jax.models import methods
from synqt_jax.models import synqt
from synqt_jax.training import feature_cache

BATCH = 64
NUM_CLASSES = common.NUM_CLASSES
TARGETS = {'train_speedup': {4: 8.0, 16: 3.0}, 'with_eval_speedup': {4: 5.0},
           'recompute_temp_ratio': 0.25}


def parse_args():
  parser = common.recipe_parser(__doc__)
  parser.add_argument('--tokens', default='1,4,16',
                      help='T values, comma-separated.')
  parser.add_argument('--online-steps', type=int, default=1,
                      help='Timed online steps per T (after one warm-up).')
  parser.add_argument('--cached-steps', type=int, default=3,
                      help='Timed cached steps per T (after one warm-up).')
  parser.add_argument('--memory-tokens', type=int, default=4,
                      help='T at which the memory modes are compared; 0: skip.')
  parser.add_argument('--json', default='benchmarks/results/feature_cache.json')
  args = parser.parse_args()
  if args.memory_tokens and str(args.memory_tokens) not in args.tokens.split(','):
    parser.error(f'--memory-tokens {args.memory_tokens} must be one of --tokens.')
  return args


def random_source(num_examples, seed=0):
  rng = np.random.default_rng(seed)
  return sources.ArraySource(
      rng.integers(0, 256, (num_examples, 224, 224, 3), np.uint8),
      rng.integers(0, NUM_CLASSES, num_examples), NUM_CLASSES)


def seconds(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def compiled_train_step(method, frozen, batch):
  """The trainer's step (`common.pmapped_train_step`) of `method`, compiled for `batch`.

  `batch` has the leading device axis, as `FeatureCache.batches` gives it.
  Returns the compiled step, its (state, frozen) arguments and the compile
  seconds.
  """
  state = common.with_device_axis(common.initial_state(method, frozen,
                                                       abstract=False))
  frozen = common.with_device_axis(frozen)
  start = time.perf_counter()
  compiled = common.compile_step((state, frozen, batch))
  return compiled, (state, frozen), time.perf_counter() - start


def timed_steps(method, frozen, batches, steps):
  """`common.step_seconds` of `method` on `batches`, with the compile seconds and step."""
  first = next(batches)
  compiled, (state, frozen), compile_s = compiled_train_step(method, frozen,
                                                             first)
  times = common.step_seconds(compiled, state, frozen,
                              itertools.chain([first], batches), steps)
  return times, compile_s, compiled


def measure_build(vit, frozen, replicated, subset):
  """Warm seconds to cache `subset` (+ the padding row): the second of two builds."""
  method = methods.SynQT(vit, synqt.SynQTConfig(num_classes=NUM_CLASSES))
  build = lambda: feature_cache.build(method, replicated, subset,
                                      normalization='imagenet',
                                      batch_size=BATCH)
  start = time.perf_counter()
  build()
  cold = time.perf_counter() - start
  start = time.perf_counter()
  cache = build()
  return cache, {'rows': len(subset) + 1, 'cold_s': cold,
                 'warm_s': time.perf_counter() - start}


def measure_tokens(vit, frozen, cache, tokens, args):
  """Online and cached step times, scoring time and the default mode's memory."""
  method = methods.SynQT(vit, synqt.SynQTConfig(num_classes=NUM_CLASSES,
                                                token_nums=tokens))
  online_s, online_compile, online = timed_steps(
      method, frozen, itertools.repeat(image_batch()), args.online_steps)
  cached_s, cached_compile, _ = timed_steps(
      method, frozen, cache.batches(BATCH, seed=0), args.cached_steps)

  params = method.init(jax.random.PRNGKey(0), frozen, None)
  kv = next(cache.batches(BATCH, seed=0))['kv'][0]
  score = jax.jit(method.apply_kv).lower(params, frozen, kv).compile()
  seconds(score, params, frozen, kv)  # Warm-up.
  return {
      'online_step_s': float(np.median(online_s)),
      'cached_step_s': float(np.median(cached_s)),
      'score_batch_s': seconds(score, params, frozen, kv),
      'online_compile_s': online_compile, 'cached_compile_s': cached_compile,
      'keep_kv_temp_bytes': online.memory_analysis().temp_size_in_bytes,
  }


def image_batch():
  """An online batch of random images, with the leading device axis."""
  return common.with_device_axis({
      'image': np.zeros((BATCH, 224, 224, 3), np.float32),
      'label': np.zeros(BATCH, np.int32), 'mask': np.ones(BATCH, np.float32)})


def recompute_temp_bytes(vit, frozen, tokens):
  """Temporary bytes of the compiled online train step in 'recompute' mode."""
  method = methods.SynQT(vit, synqt.SynQTConfig(
      num_classes=NUM_CLASSES, token_nums=tokens, image_path_memory='recompute'))
  compiled, _, _ = compiled_train_step(method, frozen, image_batch())
  return compiled.memory_analysis().temp_size_in_bytes


def project(measured, build, args):
  """The recipe's end-to-end seconds, online vs cached (+ deferred evaluation).

  A test image's backbone pass costs what a cached row cost to build; a
  separate evaluation adds the query-path scoring to it.
  """
  steps = batching.steps_per_epoch(args.train_images, BATCH)
  kv_per_image = build['warm_s'] / build['rows']
  build_s = kv_per_image * (args.train_images + 1)
  online_epoch = steps * measured['online_step_s']
  cached_epoch = steps * measured['cached_step_s']
  score_per_image = measured['score_batch_s'] / BATCH
  online_train = args.epochs * online_epoch
  cached_train = build_s + args.epochs * cached_epoch
  separate_evals = args.evaluations * args.test_images * (kv_per_image
                                                          + score_per_image)
  deferred_evals = args.test_images * (kv_per_image
                                       + args.evaluations * score_per_image)
  return {
      'online_epoch_s': online_epoch, 'cached_epoch_s': cached_epoch,
      'epoch_speedup': online_epoch / cached_epoch,
      'build_s': build_s,
      'online_train_s': online_train, 'cached_train_s': cached_train,
      'train_speedup': online_train / cached_train,
      'separate_evals_s': separate_evals, 'deferred_evals_s': deferred_evals,
      'online_with_evals_s': online_train + separate_evals,
      'cached_with_evals_s': cached_train + deferred_evals,
      'with_eval_speedup': (online_train + separate_evals)
                           / (cached_train + deferred_evals),
  }


def cache_bytes(vit, num_images, bytes_per_value):
  return (num_images * vit.num_layers * 2 * vit.num_tokens * vit.hidden_size
          * bytes_per_value)


def print_table(results):
  rows = [('T', 'epoch online s', 'epoch cached s', 'x',
           'build s', '(a) online h', '(a) cached h', '(a) x', 'target',
           '(b) online h', '(b) cached h', '(b) x', 'target')]
  for tokens, r in results['tokens'].items():
    p = r['projection']
    rows.append((
        tokens, f'{p["online_epoch_s"]:.0f}', f'{p["cached_epoch_s"]:.1f}',
        f'{p["epoch_speedup"]:.1f}', f'{p["build_s"]:.0f}',
        f'{p["online_train_s"] / 3600:.2f}', f'{p["cached_train_s"] / 3600:.2f}',
        f'{p["train_speedup"]:.1f}',
        _target(TARGETS['train_speedup'].get(int(tokens)), p['train_speedup']),
        f'{p["online_with_evals_s"] / 3600:.2f}',
        f'{p["cached_with_evals_s"] / 3600:.2f}',
        f'{p["with_eval_speedup"]:.1f}',
        _target(TARGETS['with_eval_speedup'].get(int(tokens)),
                p['with_eval_speedup'])))
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  for row in rows:
    print('  '.join(str(v).rjust(w) for v, w in zip(row, widths)))
  sizes = results['cache_size_bytes']
  print(f'Cache of {results["config"]["train_images"]} images: '
        f'{sizes["float32"] / 1e9:.2f} GB float32, '
        f'{sizes["bfloat16"] / 1e9:.2f} GB bfloat16.')
  memory = results.get('memory')
  if memory:
    print(f'Train step temporary memory at batch {BATCH}, T={memory["tokens"]}: '
          f'keep_kv {memory["keep_kv_temp_bytes"] / 2**20:.0f} MiB, recompute '
          f'{memory["recompute_temp_bytes"] / 2**20:.0f} MiB, ratio '
          f'{memory["ratio"]:.3f} '
          f'{_target(TARGETS["recompute_temp_ratio"], memory["ratio"], below=True)}.')


def _target(target, value, below=False):
  if target is None:
    return '-'
  met = value < target if below else value >= target
  return f'{"<" if below else ">="}{target:g} {"met" if met else "MISSED"}'


def main():
  args = parse_args()
  tokens = [int(t) for t in args.tokens.split(',')]
  load_before = os.getloadavg()
  vit = common.VIT_B16
  frozen = {'backbone': common.random_backbone(vit)}
  replicated = flax.jax_utils.replicate(frozen)
  cache, build = measure_build(vit, frozen, replicated,
                               random_source(BATCH - 1))
  results = {
      'config': {k: v for k, v in vars(args).items() if k != 'json'},
      'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                  'devices': [str(d) for d in jax.devices()],
                  'jax': jax.__version__, 'load_average_before': load_before},
      'vit': {k: str(v) for k, v in dataclasses.asdict(vit).items()},
      'batch': BATCH, 'build': build,
      'cache_size_bytes': {
          'float32': cache_bytes(vit, args.train_images, 4),
          'bfloat16': cache_bytes(vit, args.train_images, 2)},
      'targets': {k: v if isinstance(v, float) else {str(t): x for t, x in v.items()}
                  for k, v in TARGETS.items()},
      'tokens': {},
  }
  for t in tokens:
    measured = measure_tokens(vit, frozen, cache, t, args)
    results['tokens'][str(t)] = {
        'measured': measured, 'projection': project(measured, build, args)}
    print(f'T={t}: {json.dumps(results["tokens"][str(t)])}', flush=True)
  if args.memory_tokens:
    t = args.memory_tokens
    keep_kv = results['tokens'][str(t)]['measured']['keep_kv_temp_bytes']
    recompute = recompute_temp_bytes(vit, frozen, t)
    results['memory'] = {'tokens': t, 'keep_kv_temp_bytes': keep_kv,
                         'recompute_temp_bytes': recompute,
                         'ratio': recompute / keep_kv}
  results['machine']['load_average_after'] = os.getloadavg()
  print_table(results)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump(results, f, indent=1)
  print(f'Wrote {args.json}.')


if __name__ == '__main__':
  main()
