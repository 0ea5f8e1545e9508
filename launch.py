"""Trains SynQT on a task, or classifies images with a trained one.

Train (running again on the same workdir resumes):
  python launch.py --config configs/vtab1k.py:cifar100 --workdir runs/cifar100
  python launch.py --config configs/tiny.py --workdir runs/tiny \
      --config.optim.epochs=20

Sweep (every combination of a grid from one feature cache; synqt_jax/training/sweep.py):
  python launch.py sweep --config configs/vtab1k.py:dtd --workdir runs/dtd \
      --config.train.feature_cache=host --select_on val200 \
      --grid 'synqt.token_nums=1,4,16' --grid 'optim.lr=1e-3,3e-3'

Predict (top-k labels of image files):
  python launch.py predict --workdir runs/tiny image1.png image2.png
  python launch.py predict --export model.npz --checkpoint ViT-B_16.npz a.jpg

Several hosts: run the same command on every host, with a --workdir on a
filesystem they share; on TPU pod slices and SLURM/Open MPI clusters add
--multihost (JAX finds its peers), elsewhere give --coordinator_address,
--num_processes and --process_id.
"""
import logging as python_logging
import os
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from synqt_jax import errors
from synqt_jax import predict as predict_lib
from synqt_jax.config import fields as config_fields
from synqt_jax.training import compilation_cache
from synqt_jax.training import grid as grid_lib
from synqt_jax.training import sweep as sweep_lib
from synqt_jax.training import train as train_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/vtab1k.py:cifar100.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: checkpoints, metrics, results, export.')
_EXPORT = flags.DEFINE_string(
    'export', None, 'predict: an export file, instead of --workdir.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None,
    'predict: backbone checkpoint to use instead of the one the export names.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'predict: labels shown per image.',
                             lower_bound=1)
_GRID = flags.DEFINE_multi_string(
    'grid', [], "sweep: 'field=v1,v2,...' (repeat per field); default: "
    'config.sweep, else the reference\'s 24 (T x the three scales).')
_SELECT_ON = flags.DEFINE_enum(
    'select_on', 'test', sweep_lib.SELECT_ON,
    'sweep: choose on the test evaluations (the reference\'s habit, '
    'labelled so) or on a validation split, then retrain on train+val.')
_MAX_STACK = flags.DEFINE_integer(
    'max_stack', sweep_lib.MAX_STACK,
    'sweep: combinations trained together in one compiled step; fewer if '
    'compiling runs out of host memory, more on a large host.', lower_bound=1)
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    'Directory of JAX\'s persistent compilation cache, so that a second run or '
    f'a resume compiles nothing; default ${compilation_cache.DIR_VARIABLE} or '
    f'{compilation_cache.DEFAULT_DIR}; --compilation_cache= turns it off.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False,
    'Call jax.distributed.initialize() (cluster auto-detection).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-host: this process\'s index.')


def parse_flags(argv):
  """absl's flag parsing, a command-line mistake reported as one `Error:` line.

  Also loads the config file, so a missing file, a config argument it
  rejects (`vtab1k.py:cifar1000`) or an unknown `--config.x.y` field stops
  here, not as a traceback from the first use of the config.
  """
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.get('method')  # A config file that failed raises here.
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f'Error: {command_line_problem(e, argv)}') from e
  return rest


def command_line_problem(error, argv) -> str:
  """One line saying what is wrong with the command line `argv`."""
  user_error = errors.innermost_user_error(error)
  if user_error is not None:
    return str(user_error)
  config_file = config_argument(argv)
  if isinstance(error, OSError) and 'Failed loading config file' in str(error):
    path = config_file.split(':', 1)[0]
    reason = ('no such file' if not os.path.exists(path)
              else str(error).strip().splitlines()[-1].strip())
    return (f'--config={config_file}: {reason}. Give a config file such as '
            'configs/tiny.py or configs/vtab1k.py:cifar100.')
  if isinstance(error, (AttributeError, KeyError)):
    *_, innermost = errors.chain(error)  # ConfigDict's KeyError('<field>').
    name = str(innermost.args[0] if innermost.args else innermost)
    given = [arg.split('=', 1)[0] for arg in argv
             if re.match(rf'--config\.(\w+\.)*{re.escape(name)}(=|$)', arg)]
    hint = re.search(r'Did you mean \W*"(\w+)"', str(error))
    return (f'{given[0] if given else "--config"}: the config has no field '
            f'{name!r}' + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
            + '; the fields are in configs/common.py.')
  if 'Error whilst parsing config file' in str(error):  # get_config raised.
    *_, innermost = errors.chain(error)
    return f'--config={config_file}: {innermost}'
  if isinstance(error, flags.Error):
    return (str(error).strip().splitlines()[0]
            + ' (see --helpshort for the flags).')
  raise error


def config_argument(argv) -> str | None:
  """The value given to --config in `argv`."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def exit_on_early_sigterm():
  """Exits cleanly (status 0, not 143) on SIGTERM outside the training loop.

  The loop installs its own handler (it saves a checkpoint, then exits);
  before it there is nothing to save.
  """
  def handle(signum, frame):
    del signum, frame
    logging.warning('SIGTERM outside the training loop: nothing to save; '
                    'exiting.')
    raise SystemExit(0)

  signal.signal(signal.SIGTERM, handle)
  previous_hook = sys.unraisablehook

  def exit_if_swallowed(unraisable):
    """The SystemExit raised inside a callback whose exceptions Python only
    reports (JAX's garbage-collector callback): exit as the handler meant,
    not go on after a traceback."""
    if unraisable.exc_type is SystemExit:
      logging.flush()
      code = unraisable.exc_value.code  # None: 0; a message: 1, as Python exits.
      os._exit(code if isinstance(code, int) else int(code is not None))  # pylint: disable=protected-access
    previous_hook(unraisable)

  sys.unraisablehook = exit_if_swallowed


def quiet_disk_full_reports():
  """Drops the background save threads' tracebacks for a full disk.

  Orbax logs every failed stage of a save with its traceback; the run then
  stops with one `Error:` line (`main`).
  """
  logging.get_absl_handler().addFilter(is_not_disk_full_report)


def is_not_disk_full_report(record) -> bool:
  """False for a log record about a full disk (its message or its exception)."""
  return not (record.exc_info and errors.is_disk_full(record.exc_info[1])
              or errors.NO_SPACE_LEFT in record.getMessage())


def initialize_distributed():
  """Joins the other hosts' processes when launched on several hosts."""
  if not (_MULTIHOST.value or _COORDINATOR.value):
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                             _PROCESS_ID.value)


def quiet_orbax_info():
  """Orbax logs each stage of every save at INFO; keep only its warnings."""
  orbax_dir = f'{os.sep}orbax{os.sep}'
  logging.get_absl_handler().addFilter(
      lambda record: (record.levelno >= python_logging.WARNING
                      or orbax_dir not in record.pathname))


def train(argv, sweep=False):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; did you mean '
                         '`launch.py predict ...`?')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('Training needs --config and --workdir.')
  initialize_distributed()
  cache_dir = compilation_cache.directory(_COMPILATION_CACHE.value)
  compilation_cache.enable(cache_dir)
  compiles = compilation_cache.CompileCount()
  for override in config_flags.get_override_values(flags.FLAGS[_CONFIG.name]):
    if config_fields.deprecation(override):
      logging.warning(config_fields.deprecation(override))
  if sweep:
    sweep_lib.run(_CONFIG.value, _WORKDIR.value,
                  grid_lib.parse_grid(_GRID.value), _SELECT_ON.value,
                  _MAX_STACK.value)
  else:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info(compiles.summary(cache_dir))


def predict(image_paths):
  if not image_paths:
    raise app.UsageError('predict needs image files.')
  predict_lib.check_image_files(image_paths)
  path = predict_lib.export_path(_WORKDIR.value, _EXPORT.value)
  predictor = predict_lib.Predictor(path, _CHECKPOINT.value)
  for image_path, top in predictor.classify(image_paths, _TOP_K.value):
    labels = '  '.join(f'{label}:{prob:.3f}' for label, prob in top)
    print(f'{image_path}\t{labels}')


def main(argv):
  logging.set_verbosity(logging.INFO)
  quiet_orbax_info()
  quiet_disk_full_reports()
  exit_on_early_sigterm()
  try:
    if len(argv) > 1 and argv[1] == 'predict':
      predict(argv[2:])
    elif len(argv) > 1 and argv[1] == 'sweep':
      train(argv[1:], sweep=True)
    else:
      train(argv)
  except errors.UserError as e:
    raise SystemExit(f'Error: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    if errors.is_disk_full(e):
      raise SystemExit(
          f'Error: {errors.NO_SPACE_LEFT}. Free some space (or use a workdir '
          'on a larger disk) and run again: training resumes from the last '
          'checkpoint.') from e
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
