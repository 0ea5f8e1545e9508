"""Bad inputs to launch.py: one `Error:` line each, no traceback, exit 1 (issue 15).

The catalogue runs launch.py as a subprocess for what fails on the command
line before any compute (flags, config files, predict's arguments and
files); what needs a run in progress is tested in process (disk full, the
orbax noise) or in test_run_guards.py (the trainer's guards).
"""
import concurrent.futures
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

from absl import flags
import jax
import ml_collections
import numpy as np
import pytest

import launch
from synqt_jax import demo
from synqt_jax import errors
from synqt_jax import predict as predict_lib
from synqt_jax.models import methods
from synqt_jax.training import train
from synqt_jax.weights import export
from training_runs import REPO
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import launch_env
from training_runs import tiny_config

TINY = os.path.join(REPO, 'configs', 'tiny.py')
# configs/folder.py directories, each wrong in one way: the files they hold
# (copies of one image; a trailing / is an empty directory).
BAD_FOLDERS = {
    'no_train': ('test/cat/0.png', 'test/dog/0.png'),
    'images_directly_in_train': ('train/0.png', 'train/1.png', 'test/cat/0.png'),
    'empty_class': ('train/cat/0.png', 'train/dog/0.png', 'train/emu/',
                    'test/cat/0.png'),
    'class_only_in_test': ('train/cat/0.png', 'train/dog/0.png',
                           'test/yak/0.png'),
    'single_class': ('train/cat/0.png', 'train/cat/1.png', 'test/cat/0.png'),
}
# A finished sweep (sweep.py's layout): its members' names, the chosen one.
SWEEP_MEMBERS, SWEEP_CHOSEN = ('lr=0.001', 'lr=0.01', 'lr=0.1'), 'lr=0.01'


def folder_case(name):
  """launch.py arguments training configs/folder.py on BAD_FOLDERS[name]."""
  return ['--config', f'configs/folder.py:{{root}}/folders/{name}', '--workdir',
          f'{{root}}/folder_runs/{name}', '--config.data.normalization=inception']


def sweep_case(name, grid):
  return ['sweep', '--config', TINY, '--workdir', f'{{root}}/sweeps/{name}',
          '--grid', grid]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """An untrained export of the tiny config, a good and a corrupt image, and more."""
  root = tmp_path_factory.mktemp('bad_inputs')
  config = train.resolve_workdir_paths(tiny_config(), root / 'run')
  demo.prepare(config)
  method, frozen = methods.create_method(config)
  params = method.init(jax.random.PRNGKey(0), frozen, None)
  export.save(str(root / 'model.npz'), jax.device_get(params),
              export.metadata(config, step=0))
  with open(root / 'model.npz', 'rb') as f:
    whole = f.read()
  (root / 'truncated.npz').write_bytes(whole[:len(whole) // 2])
  (root / 'not_an_export.npz').write_bytes(b'no zip, no npy' * 10)
  (root / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 50)
  (root / 'a_file').write_text('not a directory')
  image = os.path.join(config.data.root, 'eurosat', 'images', 'test',
                       '000000.png')
  for name, paths in BAD_FOLDERS.items():
    for path in paths:
      path = os.path.join(root, 'folders', name, path)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if not path.endswith('/'):
        shutil.copy(image, path)
  write_finished_sweep(root / 'sweep', root / 'model.npz')
  return {'root': str(root), 'image': image}


def write_finished_sweep(workdir, export_file, held_out=False):
  """A sweep's results.json and its runs' exports; `held_out`: the chosen one
  retrained in final/, the selection runs without exports."""
  rows = [{'name': name, 'fields': {}} for name in SWEEP_MEMBERS]
  os.makedirs(workdir)
  train.write_json(os.path.join(workdir, 'results.json'),
                   {'chosen': SWEEP_CHOSEN, 'combinations': rows})
  for name in ['final'] if held_out else SWEEP_MEMBERS:
    os.makedirs(workdir / name)
    shutil.copy(export_file, workdir / name / 'export.npz')


# (name, launch.py arguments ({root}, {image}: the fixture's), what the line says)
CATALOGUE = [
    ('unknown_vtab_task', ['--config', 'configs/vtab1k.py:cifar1000',
                           '--workdir', '{root}/w'], "Did you mean 'cifar100'"),
    ('fgvc_task_in_the_vtab_config', ['--config', 'configs/vtab1k.py:cub200',
                                      '--workdir', '{root}/w'],
     'configs/fgvc.py'),
    ('missing_config_file', ['--config', 'configs/nope.py', '--workdir',
                             '{root}/w'], 'configs/nope.py: no such file'),
    ('unknown_config_field', ['--config', TINY, '--config.optim.lrr=3',
                              '--workdir', '{root}/w'],
     "--config.optim.lrr: the config has no field 'lrr' (did you mean 'lr'?)"),
    ('config_value_of_the_wrong_type', ['--config', TINY,
                                        '--config.optim.lr=abc',
                                        '--workdir', '{root}/w'],
     'could not convert'),
    ('unknown_flag', ['--config', TINY, '--workdir', '{root}/w', '--wrkdir=x'],
     "Unknown command line flag 'wrkdir'"),
    ('workdir_is_a_file', ['--config', TINY, '--workdir', '{root}/a_file'],
     'is a file, not a directory'),
    ('workdir_under_a_file', ['--config', TINY, '--workdir',
                              '{root}/a_file/run'], 'which is a file'),
    ('predict_with_workdir_and_export', ['predict', '--workdir', '{root}',
                                         '--export', '{root}/model.npz',
                                         '{image}'], 'not both'),
    ('predict_top_k_0', ['predict', '--export', '{root}/model.npz',
                         '--top_k=0', '{image}'], 'not a positive integer'),
    ('predict_top_k_negative', ['predict', '--export', '{root}/model.npz',
                                '--top_k=-2', '{image}'],
     'not a positive integer'),
    ('predict_missing_image', ['predict', '--export', '{root}/model.npz',
                               '{root}/missing.png'], 'does not exist'),
    ('predict_directory', ['predict', '--export', '{root}/model.npz',
                           '{root}'], 'is a directory; give image files'),
    ('predict_corrupt_image', ['predict', '--export', '{root}/model.npz',
                               '{root}/corrupt.png'],
     'Give an image file PIL can read'),
    ('predict_truncated_export', ['predict', '--export',
                                  '{root}/truncated.npz', '{image}'],
     'is truncated or corrupt'),
    ('predict_not_an_export', ['predict', '--export',
                               '{root}/not_an_export.npz', '{image}'],
     'is truncated or corrupt (not an .npz file)'),
    ('predict_unfinished_workdir', ['predict', '--workdir', '{root}/a_dir',
                                    '{image}'], 'has no export.npz'),
    # Issue 29: your own folders, sweep grids, num_classes, predict on a sweep.
    ('folder_without_train', folder_case('no_train'),
     'No split file train.txt or train.json, or ImageFolder directory '
     'train/<class name>/'),
    ('folder_with_images_directly_in_train',
     folder_case('images_directly_in_train'),
     'train holds images but no class directories; an ImageFolder split is '
     'train/<class name>/<images>: move each class'),
    ('folder_with_an_empty_class', folder_case('empty_class'),
     "Class 'emu' has no training images in"),
    ('folder_with_a_class_only_in_test', folder_case('class_only_in_test'),
     "or remove {root}/folders/class_only_in_test/test/yak."),
    ('folder_with_a_single_class', folder_case('single_class'),
     "have only the class directory 'cat': a classifier needs two classes or "
     'more'),
    # The documented override is taken (None by default): the tiny data's
    # labels 0..9 do not fit 5 classes.
    ('num_classes_on_the_command_line',
     ['--config', TINY, '--config.data.num_classes=5', '--workdir',
      '{root}/num_classes_5'], 'is outside the valid range 0..4 (5 classes)'),
    ('num_classes_1', ['--config', TINY, '--config.data.num_classes=1',
                       '--workdir', '{root}/w'],
     'data.num_classes=1; expected None (from the task or the data) or an '
     'int >= 2'),
    ('sweep_grid_with_an_empty_value', sweep_case('empty', 'optim.lr=1e-3,,3e-3'),
     "--grid 'optim.lr=1e-3,,3e-3': expected field=value,value,... with no "
     'empty value'),
    ('sweep_grid_of_words_for_an_int', sweep_case('words', 'synqt.token_nums=a,b'),
     "Sweep of synqt.token_nums: 'a' is not of type int, as "
     'config.synqt.token_nums (now 4) is'),
    ('sweep_grid_of_floats_for_an_int',
     sweep_case('floats', 'synqt.token_nums=1.5,2'),
     'Sweep of synqt.token_nums: 1.5 is not of type int'),
    ('sweep_grid_value_the_field_refuses',
     sweep_case('zero', 'synqt.token_nums=0,2'),
     'Combination token_nums=0 of the sweep: config.synqt.token_nums=0; '
     'expected a positive int'),
    ('predict_finished_sweep', ['predict', '--workdir', '{root}/sweep',
                                '{image}'],
     f'is a sweep of 3 runs, not one run: predict with the chosen one '
     f'({SWEEP_CHOSEN}), --workdir {{root}}/sweep/{SWEEP_CHOSEN}, or another '
     "member's, --workdir {root}/sweep/<name> with <name> one of lr=0.001, "
     'lr=0.1.'),
]


def run_launch_py(args, compilation_cache=None):
  return subprocess.run([sys.executable, os.path.join(REPO, 'launch.py'), *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=launch_env(compilation_cache or ''))


def assert_one_error_line(out, says):
  output = out.stdout + out.stderr
  assert out.returncode == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  lines = [line for line in output.splitlines() if line.startswith('Error:')]
  assert len(lines) == 1, output[-3000:]
  assert says in lines[0], lines[0]
  assert 'allow_pickle' not in lines[0]
  assert 'remove it from the split file' not in lines[0]


@pytest.fixture(scope='module')
def catalogue_runs(files):
  """name -> launch.py's result for each case, two processes at a time."""
  os.makedirs(os.path.join(files['root'], 'a_dir'), exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = {name: pool.submit(run_launch_py,
                              [arg.format(**files) for arg in args])
            for name, args, _ in CATALOGUE}
    return {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize('name,says', [(name, says) for name, _, says in CATALOGUE],
                         ids=[case[0] for case in CATALOGUE])
def test_bad_input_gives_one_error_line(catalogue_runs, files, name, says):
  assert_one_error_line(catalogue_runs[name], says.format(**files))


def test_a_refused_sweep_grid_writes_nothing(catalogue_runs, files):
  """Issue 29: so the next sweep on the workdir, with a good grid, may start."""
  assert len(catalogue_runs) == len(CATALOGUE)
  assert not os.path.exists(os.path.join(files['root'], 'sweeps'))


def test_predict_on_a_sweep_names_the_chosen_run(tmp_path, files):
  """Issue 29: held out, the chosen run is final/; unfinished, the sweep says so."""
  workdir = tmp_path / 'held_out'
  write_finished_sweep(workdir, os.path.join(files['root'], 'model.npz'),
                       held_out=True)
  with pytest.raises(predict_lib.PredictInputError) as info:
    predict_lib.export_path(str(workdir))
  assert str(info.value) == (
      f'{str(workdir)!r} is a sweep of 3 runs, not one run: predict with the '
      f'chosen one ({SWEEP_CHOSEN}), --workdir {workdir}/final.')
  unfinished = tmp_path / 'unfinished'
  os.makedirs(unfinished / 'selection')
  train.write_json(str(unfinished / 'selection' / 'identity.json'),
                   {'sweep_grid': '{}'})
  with pytest.raises(predict_lib.PredictInputError,
                     match='is a sweep that has not finished: run `launch.py '
                     'sweep` with this workdir again'):
    predict_lib.export_path(str(unfinished))


def test_predict_still_works_on_a_good_image(files):
  out = run_launch_py(['predict', '--export',
                       os.path.join(files['root'], 'model.npz'), '--top_k=2',
                       files['image']])
  assert out.returncode == 0, out.stderr[-3000:]
  path, labels = out.stdout.strip().split('\t')
  assert path == files['image'] and len(labels.split()) == 2


def test_early_sigterm_in_a_gc_callback_still_exits_0():
  """A SIGTERM that lands while Python runs a garbage-collector callback (JAX
  has one): Python reports and drops the handler's SystemExit there; the run
  must still exit, cleanly, not go on after a traceback."""
  code = textwrap.dedent('''
      import gc, os, signal
      import launch
      launch.exit_on_early_sigterm()
      gc.callbacks.append(lambda phase, info: phase == 'start' and os.kill(
          os.getpid(), signal.SIGTERM))
      gc.collect()
      print('went on')
      raise SystemExit(3)
      ''')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, 'PYTHONPATH': REPO})
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert 'went on' not in out.stdout
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert 'SIGTERM outside the training loop' in out.stderr


def test_sigterm_before_the_training_loop_exits_0(tmp_path, compilation_cache):
  """Defect 9: SIGTERM while the run is still setting up is a clean exit."""
  workdir = tmp_path / 'early'
  process = subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'launch.py'), '--config', TINY,
       '--workdir', str(workdir)], cwd=REPO, env=launch_env(compilation_cache),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 120
  while not (workdir / 'config.json').exists():  # Past launch.py's setup.
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  assert 'Traceback' not in output


# In process: what needs a run in progress.


@pytest.fixture
def parsed_flags():
  """launch.py's flags parsed for a training run; all put back afterwards."""
  def parse(workdir):
    return launch.parse_flags(['launch.py', '--config', TINY,
                               '--workdir', str(workdir)])
  sigterm = signal.getsignal(signal.SIGTERM)  # launch.main installs its own.
  yield parse
  signal.signal(signal.SIGTERM, sigterm)
  flags.FLAGS.unparse_flags()


def test_disk_full_is_one_error_line(parsed_flags, tmp_path, monkeypatch):
  """Defect 7: orbax reports ENOSPC as a ValueError from TensorStore."""
  def full_disk(config, workdir):
    del config, workdir
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT '
                       'database: [OS error 28: No space left on device]') from e

  monkeypatch.setattr(launch.train_lib, 'train_and_evaluate', full_disk)
  argv = parsed_flags(tmp_path / 'run')
  with pytest.raises(SystemExit) as exit_info:
    launch.main(argv)
  assert str(exit_info.value.code).startswith('Error: No space left on device.')
  assert 'resumes from the last checkpoint' in str(exit_info.value.code)


def test_orbax_disk_full_tracebacks_are_dropped():
  """Defect 7: the background save threads' ERROR records of a full disk."""
  try:
    raise ValueError('RESOURCE_EXHAUSTED: [OS error 28: No space left on '
                     'device]')
  except ValueError:
    exc_info = sys.exc_info()
  noisy = logging.LogRecord('orbax', logging.ERROR, 'async_checkpointer.py', 1,
                            'Failed to run 4 Handler Commit operations', (),
                            exc_info)
  other = logging.LogRecord('orbax', logging.ERROR, 'checkpoint_manager.py', 1,
                            'Something else failed', (), None)
  assert not launch.is_not_disk_full_report(noisy)
  assert launch.is_not_disk_full_report(other)


def test_a_bug_keeps_its_traceback(parsed_flags, tmp_path, monkeypatch):
  def bug(config, workdir):
    raise KeyError('a bug')

  monkeypatch.setattr(launch.train_lib, 'train_and_evaluate', bug)
  with pytest.raises(KeyError):
    launch.main(parsed_flags(tmp_path / 'run'))


def test_every_designed_error_is_a_user_error():
  """Defect 7: launch.py shows these as one line."""
  from synqt_jax.data import folders, sources, tasks  # pylint: disable=g-import-not-at-top
  from synqt_jax import predict  # pylint: disable=g-import-not-at-top
  from synqt_jax.training import checkpointing, nonfinite, workdir  # pylint: disable=g-import-not-at-top
  designed = [errors.CheckpointError, export.ExportError,
              folders.FolderNotFoundError, folders.SplitFileError,
              folders.MissingImageError, folders.CorruptImageError,
              errors.DataConfigError,
              sources.TfdsNotPreparedError,
              tasks.UnknownTaskError, tasks.LabelOutOfRangeError,
              checkpointing.NoUsableCheckpointError,
              predict.PredictInputError, workdir.WorkdirError,
              workdir.RunMismatchError, nonfinite.DivergedError,
              nonfinite.NonFiniteBackboneError]
  for error in designed:
    assert issubclass(error, errors.UserError), error
  assert all(issubclass(e, errors.UserError) for e in designed)


def test_export_load_of_a_truncated_file_is_an_export_error(files):
  """Defect 7: zipfile.BadZipFile and numpy's allow_pickle advice."""
  for name in ('truncated.npz', 'not_an_export.npz', 'missing.npz'):
    with pytest.raises(export.ExportError) as info:
      export.load(os.path.join(files['root'], name))
    assert 'allow_pickle' not in str(info.value)
  params, meta = export.load(os.path.join(files['root'], 'model.npz'))
  assert meta['step'] == 0 and set(params) == {'synqt', 'head'}


def test_unreadable_npz_drops_numpy_advice(tmp_path):
  path = tmp_path / 'x.npz'
  path.write_bytes(b'garbage that is no zip and no npy')
  with pytest.raises(ValueError) as info:
    np.load(path, allow_pickle=False)
  assert 'allow_pickle' in str(info.value)  # numpy's own text...
  assert errors.unreadable_npz(info.value) == 'not an .npz file'  # ...dropped.


def test_configs_reach_the_run_unchanged(parsed_flags, tmp_path, monkeypatch):
  """parse_flags loads the config it checks: the run gets the same one."""
  seen = {}
  monkeypatch.setattr(launch.train_lib, 'train_and_evaluate',
                      lambda config, workdir: seen.update(config=config))
  launch.main(parsed_flags(tmp_path / 'run'))
  assert isinstance(seen['config'], ml_collections.ConfigDict)
  assert seen['config'].demo.width == 32
