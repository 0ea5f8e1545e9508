"""Classifies image files with a trained workdir or an export.

  python launch.py predict --export runs/cifar100/export.npz cat.jpg dog.png
"""
import json
import os

from etils import epath
import jax
import numpy as np

from synqt_jax import errors
from synqt_jax.config import fields as config_fields
from synqt_jax.data import folders
from synqt_jax.data import preprocess
from synqt_jax.models import methods
from synqt_jax.training import sweep
from synqt_jax.training import workdir as workdir_lib
from synqt_jax.weights import export


class PredictInputError(errors.UserError, ValueError):
  """Bad arguments to predict: the model to use, or the image files."""


def export_path(workdir=None, export_file=None):
  """The export to use: `export_file`, or the one a finished run left in `workdir`."""
  if (workdir is None) == (export_file is None):
    raise PredictInputError(
        'predict needs --workdir (a finished run) or --export (an export '
        f'file){", not both" if workdir else ""}.')
  if export_file is not None:
    return export_file
  path = os.path.join(workdir, export.FILE)
  if not epath.Path(path).exists():
    raise PredictInputError(sweep_problem(workdir) or (
        f'{workdir!r} has no export.npz: the run has not finished. Run '
        'launch.py with this workdir again to finish it.'))
  return path


def sweep_problem(workdir) -> str | None:
  """Which of the runs of the sweep in `workdir` to give instead, or None
  where `workdir` holds no sweep (sweep.py: a run per combination, and for
  the held-out protocol the chosen one retrained in final/)."""
  root = epath.Path(workdir)
  results = root / workdir_lib.RESULTS_FILE
  summary = json.loads(results.read_text()) if results.exists() else {}
  if 'combinations' in summary:
    chosen = root / sweep.FINAL_DIR
    if not (chosen / export.FILE).exists():
      chosen = root / summary['chosen']
    others = [r['name'] for r in summary['combinations']
              if r['name'] != summary['chosen']
              and (root / r['name'] / export.FILE).exists()]
    listed = (f', or another member\'s, --workdir {root}/<name> with <name> '
              f'one of {", ".join(others[:4])}{", ..." if len(others) > 4 else ""}'
              if others else '')
    return (f'{workdir!r} is a sweep of {len(summary["combinations"])} runs, '
            f'not one run: predict with the chosen one ({summary["chosen"]}), '
            f'--workdir {chosen}{listed}.')
  for identity in (root / workdir_lib.IDENTITY_FILE,
                   root / sweep.SELECTION_DIR / workdir_lib.IDENTITY_FILE):
    if (identity.exists()
        and sweep.GRID_IDENTITY in json.loads(identity.read_text())):
      return (f'{workdir!r} is a sweep that has not finished: run '
              '`launch.py sweep` with this workdir again to finish it, then '
              'predict with the run it chooses.')
  return None


def check_image_files(paths) -> None:
  """Raises PredictInputError if a path is missing or not a file."""
  for path in paths:
    if os.path.isdir(path):
      raise PredictInputError(
          f'{path} is a directory; give image files (e.g. {path}/*.jpg).')
    if not os.path.isfile(path):
      raise PredictInputError(f'Image file {path} does not exist.')


class Predictor:
  """An export's model, rebuilt on its backbone checkpoint.

  Args:
    path: the export file.
    checkpoint_source: the backbone to use instead of the one the export
      names (e.g. a local copy of ViT-B_16.npz).
  """

  def __init__(self, path, checkpoint_source=None):
    self.params, self.metadata = export.load(path)
    # (An older export names the backbone `checkpoint`.)
    config = config_fields.from_dict(self.metadata['config'])
    if checkpoint_source:
      config.backbone.source = checkpoint_source
    self.config = config
    self.method, self.frozen = methods.create_method(config)
    self._apply = jax.jit(self.method.apply)

  def probabilities(self, images):
    """Class probabilities [N, C] for uint8 images [N, S, S, 3] (already resized)."""
    images = preprocess.normalize(images, self.config.data.normalization)
    logits = self._apply(self.params, self.frozen, images)
    return np.asarray(jax.nn.softmax(logits.astype(np.float32)))

  def classify(self, image_paths, top_k=5, batch_size=64):
    """[(path, [(label, probability), ...])], the top `top_k` labels per image.

    Labels are the class names where the export has them, else class indices.
    """
    check_image_files(image_paths)
    size = self.config.data.image_size
    names = self.metadata.get('class_names')
    results = []
    for start in range(0, len(image_paths), batch_size):
      paths = image_paths[start:start + batch_size]
      images = np.stack([preprocess.resize(folders.load_image(p), size)
                         for p in paths])
      for path, probs in zip(paths, self.probabilities(images)):
        top = np.argsort(-probs, kind='stable')[:top_k]
        results.append((path, [(names[i] if names else int(i), float(probs[i]))
                               for i in top]))
    return results
