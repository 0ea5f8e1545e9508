"""Trains SynQT on a task, or classifies images with a trained one.

Train (running again on the same workdir resumes):
  python launch.py --config configs/vtab1k.py:cifar100 --workdir runs/cifar100
  python launch.py --config configs/tiny.py --workdir runs/tiny \
      --config.optim.epochs=20

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

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from synqt_jax import checkpoint
from synqt_jax import config_fields
from synqt_jax import config_validation
from synqt_jax import export
from synqt_jax import folders
from synqt_jax import input_pipeline
from synqt_jax import predict as predict_lib
from synqt_jax import train as train_lib

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
_TOP_K = flags.DEFINE_integer('top_k', 5, 'predict: labels shown per image.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False,
    'Call jax.distributed.initialize() (cluster auto-detection).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-host: this process\'s index.')


# Errors whose message says what to fix: shown without a traceback.
SETUP_ERRORS = (config_validation.ConfigError, input_pipeline.DataConfigError,
                input_pipeline.TfdsNotPreparedError, checkpoint.CheckpointError,
                folders.FolderNotFoundError, folders.SplitFileError,
                folders.MissingImageError)


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


def train(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; did you mean '
                         '`launch.py predict ...`?')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('Training needs --config and --workdir.')
  initialize_distributed()
  for override in config_flags.get_override_values(flags.FLAGS[_CONFIG.name]):
    if config_fields.deprecation(override):
      logging.warning(config_fields.deprecation(override))
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except SETUP_ERRORS as e:
    raise SystemExit(f'Error: {e}') from e


def predict(image_paths):
  if not image_paths:
    raise app.UsageError('predict needs image files.')
  try:
    path = predict_lib.export_path(_WORKDIR.value, _EXPORT.value)
    predictor = predict_lib.Predictor(path, _CHECKPOINT.value)
  except (*SETUP_ERRORS, FileNotFoundError, export.ExportError) as e:
    raise SystemExit(f'Error: {e}') from e
  for image_path, top in predictor.classify(image_paths, _TOP_K.value):
    labels = '  '.join(f'{label}:{prob:.3f}' for label, prob in top)
    print(f'{image_path}\t{labels}')


def main(argv):
  logging.set_verbosity(logging.INFO)
  quiet_orbax_info()
  if len(argv) > 1 and argv[1] == 'predict':
    predict(argv[2:])
  else:
    train(argv)


if __name__ == '__main__':
  app.run(main)
