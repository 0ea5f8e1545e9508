"""Trained task parameters as one small file, usable without the workdir.

An export is an `.npz` holding the trainable parameters under their flat
'/'-joined names and, under `__metadata__`, a JSON string with the config
fields that rebuild the model (method, the method's own config section,
backbone checkpoint, task, classes, resolution, normalisation, dtypes) and
the class names where the data has them. The frozen
backbone is not in it: it is the shared pre-trained checkpoint, named in the
metadata (`backbone`; older exports say `checkpoint`).
"""
import json
import zipfile

from etils import epath
import numpy as np

from synqt_jax import errors
from synqt_jax.data import data_config
from synqt_jax.training import workdir
from synqt_jax.weights import layouts

FILE = 'export.npz'  # A finished workdir's export.
METADATA_KEY = '__metadata__'
FORMAT_VERSION = 1


class ExportError(errors.UserError, ValueError):
  """A file that is not a readable export."""


def metadata(config, **extra) -> dict:
  """The config fields `predict` needs to rebuild the model, plus `extra`.

  With the task's class names where the data has them (ImageFolder), so
  `predict` prints names.
  """
  method = config.method
  return {
      'format_version': FORMAT_VERSION,
      'config': {
          'method': method,
          # The method's section, when it has one (`methods.REGISTRY`).
          **({method: config[method].to_dict()} if method in config else {}),
          'backbone': config.backbone.to_dict(),
          'data': {'num_classes': data_config.num_classes(config.data),
                   **{key: config.data[key]
                      for key in ('task', 'image_size', 'normalization')}},
          'dtype': config.dtype,
          'backbone_dtype': config.backbone_dtype,
      },
      'class_names': data_config.class_names(config.data),
      **extra,
  }


def save(path, params, meta: dict) -> None:
  """Writes `params` and `meta` to `path` (atomically: a whole file or none)."""
  arrays = {key: np.asarray(value)
            for key, value in layouts.flatten(params).items()}
  arrays[METADATA_KEY] = np.array(json.dumps(meta))
  workdir.write_file(path, lambda f: np.savez(f, **arrays), 'wb', '.npz.part')


def load(path):
  """(params, metadata) of an export written by `save`; ExportError if unreadable."""
  if not epath.Path(path).is_file():
    raise ExportError(f'Export file {path!r} does not exist. Give the '
                      'export.npz of a finished run (or its workdir).')
  try:
    with epath.Path(path).open('rb') as file, np.load(
        file, allow_pickle=False) as f:
      arrays = {key: f[key] for key in f.files}
      meta = (json.loads(str(arrays.pop(METADATA_KEY)))
              if METADATA_KEY in arrays else None)
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise ExportError(
        f'{path!r} is truncated or corrupt ({errors.unreadable_npz(e)}). '
        'Copy it again from its run\'s workdir, or write it again by running '
        'launch.py on that workdir with the same config.') from e
  if meta is None:
    raise ExportError(f'{path!r} has no {METADATA_KEY}: not a synqt_jax '
                      'export (train with launch.py to get one).')
  return layouts.nest(arrays), meta
