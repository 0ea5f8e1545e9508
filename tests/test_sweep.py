"""Sweeps (issue 18): stacked members equal single runs, resume, the protocols.

Tiny runs (configs/tiny.py via training_runs), feature cache in host RAM. The
grid has two T groups of four members that differ in a scale (an initial
value) and the learning rate (the optimizer); each group trains as a stack of
three and a stack of one (`max_stack`).
"""
import json
import os
import random
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from synqt_jax.training import grid as grid_lib
from synqt_jax.training import sweep
from synqt_jax.training import train
from training_runs import REPO
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import final_params
from training_runs import launch_command
from training_runs import launch_env
from training_runs import losses
from training_runs import read_log
from training_runs import read_metrics
from training_runs import read_results
from training_runs import reproducible
from training_runs import run_launch
from training_runs import start_launch
from training_runs import tiny_config

GRID = {'synqt.token_nums': (1, 2), 'synqt.attn_scale': (0.1, 1.0),
        'optim.lr': (3e-3, 1e-2)}
GRID_FLAGS = ('--grid', 'synqt.token_nums=1,2', '--grid',
              'synqt.attn_scale=0.1,1.0', '--grid', 'optim.lr=3e-3,1e-2')
# Each T group of four trains as a stack of three, then a stack of one.
MAX_STACK = 3
CACHED = {'train.feature_cache': 'host'}
NAMES = [grid_lib.member_name(dict(zip(GRID, v))) for v in
         [(t, a, lr) for t in GRID['synqt.token_nums']
          for a in GRID['synqt.attn_scale'] for lr in GRID['optim.lr']]]


@pytest.fixture(scope='module')
def reference_sweep(tmp_path_factory, compilation_cache):
  del compilation_cache
  workdir = tmp_path_factory.mktemp('sweep')
  summary = sweep.run(tiny_config(**CACHED), str(workdir), GRID,
                      max_stack=MAX_STACK)
  return workdir, summary


def test_grid_members_and_groups():
  config = tiny_config()
  members = grid_lib.member_configs(config, GRID)
  assert list(members) == NAMES
  keys = {grid_lib.group_key(c, GRID) for _, c in members.values()}
  assert keys == {'{"synqt.token_nums": 1}', '{"synqt.token_nums": 2}'}
  fields, member = members['token_nums=2-attn_scale=1.0-lr=0.01']
  assert (member.synqt.token_nums, member.synqt.attn_scale,
          member.optim.lr) == (2, 1.0, 0.01)
  assert fields == {'synqt.token_nums': 2, 'synqt.attn_scale': 1.0,
                    'optim.lr': 0.01}
  assert grid_lib.parse_grid(GRID_FLAGS[1::2]) == GRID


@pytest.mark.parametrize('field, message', [
    ('data.task', 'Cannot sweep data.task'),
    ('optim.epochs', 'Cannot sweep optim.epochs'),
    ('synqt.tokens', "config.synqt has no field 'tokens'"),
])
def test_fields_a_sweep_cannot_share_are_refused(field, message):
  with pytest.raises(grid_lib.SweepError, match=message):
    grid_lib.check_grid(tiny_config(), {field: (1, 2)})


@pytest.mark.parametrize('spec, message', [
    ('optim.lr=1e-3,,3e-3', 'with no empty value'),
    ('=1,2', 'expected field=value,value'),
    ('synqt.token_nums=a,b',
     "'a' is not of type int, as config.synqt.token_nums"),
    ('synqt.token_nums=1.5,2', '1.5 is not of type int'),
    ('optim.lr=fast,1e-3', "'fast' is not of type float"),
    ('optim.lr=1e-7,1e-3', r'Combination lr=1e-07 of the sweep: '
     r'config.optim.min_lr=1e-06; expected a number in \[0, optim.lr=1e-07\]'),
])
def test_values_a_field_does_not_take_are_refused(spec, message):
  """Issue 29: before the sweep writes anything (a crash there left a workdir
  that refused the next sweep)."""
  with pytest.raises(grid_lib.SweepError, match=message):
    grid_lib.check_grid(tiny_config(), grid_lib.parse_grid([spec]))


@pytest.mark.parametrize('name', ['token_nums=1-attn_scale=0.1-lr=0.01',
                                  'token_nums=2-attn_scale=1.0-lr=0.01'])
def test_member_equals_the_same_combination_trained_alone(
    reference_sweep, tmp_path, name):
  workdir, _ = reference_sweep
  _, config = grid_lib.member_configs(tiny_config(**CACHED), GRID)[name]
  alone = tmp_path / 'alone'
  train.train_and_evaluate(config, str(alone))
  member = workdir / name
  np.testing.assert_allclose(losses(member), losses(alone), rtol=2e-5,
                             atol=1e-6)
  assert len(losses(member)) == 42
  ours = jax.tree_util.tree_flatten_with_path(final_params(member))[0]
  want = jax.tree.leaves(final_params(alone))
  for (path, a), b in zip(ours, want):
    if "['k_proj']['fc2']['bias']" in jax.tree_util.keystr(path):
      # A key bias has a zero gradient (softmax ignores a shift shared by all
      # keys): Adam turns its float noise into steps of up to lr each.
      assert np.abs(a - b).max() < 42 * config.optim.lr
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  ours, want = read_results(member), read_results(alone)
  assert [e['test_accuracy'] for e in ours['evaluations']] == [
      e['test_accuracy'] for e in want['evaluations']]
  assert ours['test_accuracy'] == want['test_accuracy']


def test_summary_chooses_on_test_and_says_so(reference_sweep):
  workdir, summary = reference_sweep
  rows = summary['combinations']
  assert [r['name'] for r in rows] == NAMES
  best = max(rows, key=lambda r: r['best_test_accuracy'])
  assert summary['chosen'] == best['name']
  assert summary['test_accuracy'] == best['best_test_accuracy']
  assert summary['protocol'].startswith('chosen on test')
  for r in rows:
    assert r['test_accuracy'] == read_results(workdir / r['name'])[
        'test_accuracy']
  # The tiny task is learnable: the best combination is far above chance.
  assert summary['test_accuracy'] > 0.5
  assert (workdir / 'accuracy.png').stat().st_size > 1000
  assert summary['chosen'] in (workdir / 'summary.txt').read_text()


def wait_for_member_step(workdir, name, step, process, timeout=300):
  path = os.path.join(workdir, name, 'metrics.jsonl')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, read_log(workdir)
    if os.path.exists(path):
      steps = [m['step'] for m in read_metrics(os.path.join(workdir, name))]
      if steps and max(steps) >= step:
        return
    time.sleep(0.005)
  pytest.fail(f'{name} step {step} not reached in {timeout} s')


def test_killed_and_preempted_sweep_resumes_bit_identical(
    reference_sweep, tmp_path, compilation_cache):
  """SIGKILL at a random member and step, resume, SIGTERM later, resume."""
  reference, _ = reference_sweep
  workdir = tmp_path / 'interrupted'
  seed = random.randrange(1 << 30)
  rng = np.random.default_rng(seed)
  # SIGKILL in the first T group, SIGTERM in the second (after the restarted
  # run has written a line the killed one had not: its handler is set).
  kill = (NAMES[rng.integers(4)], int(rng.integers(2, 42)))
  term_name, term_offset = NAMES[rng.integers(4, 8)], int(rng.integers(1, 10))
  print(f'seed {seed}: SIGKILL at {kill}, SIGTERM {term_offset} steps into '
        f'{term_name}')
  args = ('sweep', *GRID_FLAGS, '--max_stack', str(MAX_STACK))

  process = start_launch(workdir, compilation_cache, CACHED, extra_args=args)
  wait_for_member_step(workdir, *kill, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (workdir / 'results.json').exists()

  written = (read_metrics(workdir / term_name)
             if (workdir / term_name / 'metrics.jsonl').exists() else [])
  term_step = min(max([m['step'] for m in written] + [0]) + term_offset, 41)
  process = start_launch(workdir, compilation_cache, CACHED, extra_args=args)
  wait_for_member_step(workdir, term_name, term_step, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(120) == 0, read_log(workdir)
  assert 'SIGTERM: saved every member' in read_log(workdir, tail=None)

  process = start_launch(workdir, compilation_cache, CACHED, extra_args=args)
  assert process.wait(300) == 0, read_log(workdir)
  for name in NAMES:
    jax.tree.map(np.testing.assert_array_equal, final_params(workdir / name),
                 final_params(reference / name))
    assert reproducible(read_metrics(workdir / name)) == reproducible(
        read_metrics(reference / name)), name
    assert (read_results(workdir / name)['evaluations'] ==
            read_results(reference / name)['evaluations'])
  ours = read_results(workdir)
  assert ours == read_results(reference)


def test_held_out_protocol_end_to_end(tmp_path, compilation_cache):
  """Chosen on val200 (trained on train800), retrained on train800val200."""
  workdir = tmp_path / 'held_out'
  summary = run_launch(workdir, compilation_cache, CACHED, extra_args=(
      'sweep', '--select_on', 'val200', '--grid', 'synqt.token_nums=1,2',
      '--grid', 'optim.lr=3e-3,1e-2'), timeout=400)
  assert summary['protocol'].startswith('held out: each combination trained '
                                        'on train800 and scored on val200')
  rows = summary['combinations']
  assert len(rows) == 4
  chosen = max(rows, key=lambda r: r['val_accuracy'])
  assert summary['chosen'] == chosen['name']
  for r in rows:
    selection = read_results(workdir / 'selection' / r['name'])
    assert 'test_accuracy' not in selection  # Test is scored once, at the end.
    assert selection['val_accuracy'] == r['val_accuracy']
    with open(workdir / 'selection' / r['name'] / 'config.json') as f:
      data = json.load(f)['data']
    assert (data['train_split'], data['val_split']) == ('train800', 'val200')
  final = read_results(workdir / 'final')
  assert final['test_accuracy'] == summary['test_accuracy']
  assert final['protocol'] == summary['protocol']
  with open(workdir / 'final' / 'config.json') as f:
    config = json.load(f)
  # A folder holds the two parts (an ImageFolder has no union directory).
  assert config['data']['train_split'] == 'train800+val200'
  assert config['data']['val_split'] is None
  want = chosen['fields']
  assert (config['synqt']['token_nums'], config['optim']['lr']) == (
      want['synqt.token_nums'], want['optim.lr'])
  # 80 training images here (train800), 100 in the final run.
  lines = [line for line in (workdir / 'tiny_data').rglob('train800.txt')]
  assert len(lines[0].read_text().splitlines()) == 80


def test_bad_grid_is_one_line(tmp_path):
  result = subprocess.run(
      launch_command(tmp_path / 'bad', CACHED, ('sweep', '--grid',
                                                'data.task=a,b')),
      cwd=REPO, env=launch_env(str(tmp_path / 'cache')), capture_output=True,
      text=True, timeout=120)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert 'Error: Cannot sweep data.task' in result.stderr
