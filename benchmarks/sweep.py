"""What a sweep in one pass costs against separate runs (issue 18).

For ViT-B/16 (random weights, `common.random_backbone`) at 224, batch 64, the
VTAB-1k recipe (1000 training images: 16 steps an epoch, 50 epochs, 5
evaluations on a 10,000-image test set) and the reference's 24-combination
grid (T in {1, 4, 16} x attn/ffn/feat_scale in {0.1, 1.0}: 8 combinations per
T), it measures on this machine:
  - the trainer's online step (`steps.train_step`, T=4: the image path
    dominates it, so it stands for every T);
  - the sweep's step (`steps.train_steps` under pmap, on batches of a
    host feature cache) with 1, 2 and 4 stacked combinations at T=4 and with
    1 and `--max_stack` at T=1 and 16 (a T group of 8 trains as stacks of at
    most `--max_stack`, `sweep.MAX_STACK` by default: 8 stacked ViT-B/16
    members do not compile within a 24 GB host);
  - a cache row's build (`feature_cache.build`, warm) and a test batch's
    query-path scoring (`apply_kv`) per T;
and projects, as benchmarks/feature_cache.py does (a test image's backbone
pass costs what a cached row costs to build):
  - one online run: 800 online steps + 5 separate evaluations (a backbone
    pass and a scoring per test image each);
  - 24 online runs: 24 of those;
  - 24 cached runs: each its own cache build, 800 cached steps and a deferred
    evaluation (one backbone pass, 5 scorings);
  - the sweep: one cache build, 800 steps per stack of each T group, one
    backbone pass over the test set and 24 x 5 scorings.
Headline: `ratio_to_one_online_run` (the sweep over one online run, both with
their evaluations; target <= 3.5). Runs in about 20 minutes on 2 CPU cores.

  python -m benchmarks.sweep --json benchmarks/results/sweep.json \
      [--stacks 1,2,4] [--max_stack 4] [--steps 1]
"""
import functools
import itertools
import os
import time

import flax.jax_utils
import jax
import numpy as np

from benchmarks import common
from benchmarks import feature_cache as cache_benchmark
from synqt_jax.data import batching
from synqt_jax.models import methods
from synqt_jax.models import synqt
from synqt_jax.training import devices
from synqt_jax.training import grid as grid_lib
from synqt_jax.training import steps
from synqt_jax.training import sweep

BATCH = cache_benchmark.BATCH
TOKENS = (1, 4, 16)
PER_GROUP = 8  # attn/ffn/feat_scale in {0.1, 1.0}.
ONLINE_TOKENS = 4
TARGET_RATIO = 3.5


def parse_args():
  parser = common.recipe_parser(__doc__)
  parser.add_argument('--stacks', default='1,2,4',
                      help='Stacked combinations timed at T=4.')
  parser.add_argument('--max_stack', type=int, default=sweep.MAX_STACK,
                      help='Combinations per compiled step (launch.py sweep '
                      '--max_stack).')
  parser.add_argument('--steps', type=int, default=1,
                      help='Timed steps per point (after one warm-up).')
  parser.add_argument('--json', default='benchmarks/results/sweep.json')
  return parser.parse_args()


def synqt_method(tokens, cached=True):
  """SynQT as the trainer builds it: no image-path drop path when cached."""
  return methods.SynQT(common.VIT_B16, synqt.SynQTConfig(
      num_classes=common.NUM_CLASSES, token_nums=tokens,
      image_drop_path=not cached))


def stacked_step_seconds(tokens, stack, frozen, cache, timed_steps):
  """(seconds of each timed step, compile seconds) of `stack` stacked members."""
  method = synqt_method(tokens)
  states = tuple(common.with_device_axis(common.initial_state(
      method, frozen, abstract=False)) for _ in range(stack))
  p_frozen = common.with_device_axis(frozen)
  step = jax.pmap(functools.partial(
      steps.train_steps,
      learning_rate_fns=(common.learning_rate_schedule(),) * stack),
      axis_name=devices.AXIS, donate_argnums=(0,),
      devices=jax.local_devices()[:1])
  batches = cache.batches(BATCH, seed=0)
  first = next(batches)
  start = time.perf_counter()
  compiled = step.lower(states, p_frozen, first).compile()
  compile_s = time.perf_counter() - start
  times = common.step_seconds(compiled, states, p_frozen,
                              itertools.chain([first], batches), timed_steps)
  return times, compile_s


def score_seconds(tokens, frozen, cache):
  """Seconds to score one cached batch with the query path (warm)."""
  method = synqt_method(tokens)
  params = method.init(jax.random.PRNGKey(0), frozen, None)
  kv = next(cache.batches(BATCH, seed=0))['kv'][0]
  score = jax.jit(method.apply_kv).lower(params, frozen, kv).compile()
  cache_benchmark.seconds(score, params, frozen, kv)
  return cache_benchmark.seconds(score, params, frozen, kv)


def project(m, args):
  """End-to-end seconds of the four ways to run the grid (module docstring)."""
  steps = args.epochs * batching.steps_per_epoch(args.train_images, BATCH)
  kv_per_image = m['build']['warm_s'] / m['build']['rows']
  build_s = kv_per_image * (args.train_images + 1)
  test_kv = args.test_images * kv_per_image
  score = {t: m['score_batch_s'][t] / BATCH * args.test_images for t in TOKENS}
  one_online_train = steps * m['online_step_s']
  one_online = one_online_train + args.evaluations * (test_kv +
                                                      score[ONLINE_TOKENS])
  online_runs = sum(PER_GROUP * (one_online_train + args.evaluations *
                                 (test_kv + score[t])) for t in TOKENS)
  cached_runs = sum(PER_GROUP * (build_s + steps * m['stacked_step_s'][t]['1']
                                 + test_kv + args.evaluations * score[t])
                    for t in TOKENS)
  sweep_train = build_s + sum(steps * m['stacked_step_s'][t][str(size)]
                              for t in TOKENS
                              for size in stack_sizes(args.max_stack))
  sweep_s = sweep_train + test_kv + sum(
      PER_GROUP * args.evaluations * score[t] for t in TOKENS)
  return {
      'one_online_run_s': one_online, 'one_online_run_training_s':
          one_online_train,
      'online_runs_s': online_runs, 'cached_runs_s': cached_runs,
      'sweep_s': sweep_s, 'sweep_training_s': sweep_train,
      'ratio_to_one_online_run': sweep_s / one_online,
      'ratio_to_one_online_run_training_only': sweep_train / one_online_train,
      'online_runs_over_sweep': online_runs / sweep_s,
      'cached_runs_over_sweep': cached_runs / sweep_s,
  }


def stack_sizes(max_stack):
  """The stacks a T group of PER_GROUP trains as (`sweep`'s chunking)."""
  return [len(stack) for stack in grid_lib.stacks(range(PER_GROUP), max_stack)]


def print_table(results):
  p = results['projection']
  print(f'{"24 combinations, VTAB-1k recipe":34} {"hours":>8} '
        f'{"x one online run":>17}')
  for label, key in (('one online run', 'one_online_run_s'),
                     ('24 online runs', 'online_runs_s'),
                     ('24 cached runs', 'cached_runs_s'),
                     ('sweep in one pass', 'sweep_s')):
    print(f'{label:34} {p[key] / 3600:8.2f} '
          f'{p[key] / p["one_online_run_s"]:17.2f}')
  met = p['ratio_to_one_online_run'] <= TARGET_RATIO
  print(f'ratio_to_one_online_run {p["ratio_to_one_online_run"]:.2f} '
        f'(target <= {TARGET_RATIO}: {"met" if met else "MISSED"}); '
        'training only '
        f'{p["ratio_to_one_online_run_training_only"]:.2f}.')
  print('Stacked step seconds (T: combinations -> s):')
  for t, by_stack in results['measured']['stacked_step_s'].items():
    print(f'  T={t}: ' + ', '.join(f'{k}: {v:.2f}' for k, v in by_stack.items()))


def main():
  args = parse_args()
  load_before = os.getloadavg()
  vit = common.VIT_B16
  frozen = {'backbone': common.random_backbone(vit)}
  replicated = flax.jax_utils.replicate(frozen)
  cache, build = cache_benchmark.measure_build(
      vit, frozen, replicated, cache_benchmark.random_source(BATCH - 1))
  print(f'build: {build}', flush=True)
  online_s, online_compile, _ = cache_benchmark.timed_steps(
      synqt_method(ONLINE_TOKENS, cached=False), frozen,
      itertools.repeat(cache_benchmark.image_batch()), args.steps)
  print(f'online step: {online_s}', flush=True)
  chunks = set(stack_sizes(args.max_stack))
  stacks = {t: sorted({1} | chunks) for t in TOKENS}
  stacks[4] = sorted(set(common.parse_ints(args.stacks)) | {1} | chunks)
  stacked, compile_s = {}, {}
  for t, counts in stacks.items():
    for count in counts:
      times, seconds = stacked_step_seconds(t, count, frozen, cache, args.steps)
      stacked.setdefault(t, {})[str(count)] = float(np.median(times))
      compile_s[f'T={t},stack={count}'] = seconds
      print(f'T={t}, {count} stacked: {times} s', flush=True)
  measured = {
      'build': build, 'online_step_s': float(np.median(online_s)),
      'online_compile_s': online_compile, 'stacked_step_s': stacked,
      'stacked_compile_s': compile_s,
      'score_batch_s': {t: score_seconds(t, frozen, cache) for t in TOKENS}}
  results = {
      'config': {k: v for k, v in vars(args).items() if k != 'json'},
      'machine': {**common.backend_description(), 'cpus': os.cpu_count(),
                  'load_average_before': load_before,
                  'load_average_after': os.getloadavg()},
      'batch': BATCH, 'grid': {'token_nums': TOKENS, 'per_token_count':
                               PER_GROUP,
                               'stacks_per_token_count':
                               stack_sizes(args.max_stack)},
      'measured': measured, 'projection': project(measured, args),
      'target_ratio_to_one_online_run': TARGET_RATIO}
  results['ratio_to_one_online_run'] = results['projection'][
      'ratio_to_one_online_run']
  print_table(results)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  common.write_json(args.json, results)
  print(f'Wrote {args.json}.')


if __name__ == '__main__':
  main()
