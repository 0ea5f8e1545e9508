"""Trained task parameters as one small file, usable without the workdir.

An export is an `.npz` holding the trainable parameters under their flat
'/'-joined names and, under `__metadata__`, a JSON string with the config
fields that rebuild the model (method, SynQT settings, backbone checkpoint,
task, classes, resolution, normalisation, dtype) and the class names. The frozen backbone is not in it: it
is the shared pre-trained checkpoint, named in the metadata.
"""
import json
import os
import tempfile

import numpy as np

from synqt_jax import checkpoint
from synqt_jax import input_pipeline

METADATA_KEY = '__metadata__'
FORMAT_VERSION = 1


class ExportError(ValueError):
  """A file that is not a readable export."""


def metadata(config, **extra) -> dict:
  """The config fields `predict` needs to rebuild the model, plus `extra`.

  With the task's class names where the data has them (ImageFolder), so
  `predict` prints names.
  """
  class_names = input_pipeline.class_names(config.data)
  return {
      'format_version': FORMAT_VERSION,
      'config': {
          'method': config.method,
          'synqt': config.synqt.to_dict(),
          'checkpoint': config.checkpoint.to_dict(),
          'data': {'num_classes': input_pipeline.num_classes(config.data),
                   **{key: config.data[key]
                      for key in ('task', 'image_size', 'normalization')}},
          'dtype': config.dtype,
      },
      'class_names': class_names,
      **extra,
  }


def save(path, params, meta: dict) -> None:
  """Writes `params` and `meta` to `path` (atomically: a whole file or none)."""
  arrays = {key: np.asarray(value)
            for key, value in checkpoint.flatten(params).items()}
  arrays[METADATA_KEY] = np.array(json.dumps(meta))
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.npz.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; an export is to share.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load(path):
  """(params, metadata) of an export written by `save`."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {key: f[key] for key in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise ExportError(f'{path!r} is not a readable export ({e}).') from e
  if METADATA_KEY not in arrays:
    raise ExportError(f'{path!r} has no {METADATA_KEY}: not a synqt_jax '
                      'export (train with launch.py to get one).')
  meta = json.loads(str(arrays.pop(METADATA_KEY)))
  return checkpoint.nest(arrays), meta
