"""The data config: its fields checked, the task it names, each split's Source.

Data config (a ConfigDict, `config.data` in the trainer; `default_data_config`
builds one):
  source: 'tfds' (TFDS builders read with `tfds.data_source`) or 'folder'
    (prepared image folders, see folders.py); `sources.SOURCES` has each.
  task: task name or alias (tasks.py), e.g. 'cifar100', 'kitti', 'cub200';
    with source='folder' also any name of your own (see folders.py).
  num_classes: None (the registered task's, or for your own task what the
    data shows: ImageFolder class directories, 1 + the largest listed label)
    or the number of classes (2 or more).
  root: TFDS data_dir (None: TFDS's default, $TFDS_DATA_DIR or
    ~/tensorflow_datasets) or the prepared-folder root.
  image_size: side S of the square images the model sees (224).
  normalization: 'imagenet' ((x/255 - mean)/std, the SynQT reference),
    'inception' ((x - 127.5)/127.5, the scaling Google's ViT checkpoints saw)
    or 'auto' (what the checkpoint records, see
    `preprocess.resolve_normalization`).
  train_split: 'train800val200' (VTAB) or 'train' / 'train+val' (FGVC).
  test_split: 'test'.
  val_split: 'val200' (VTAB), 'val' (FGVC) or None.
  augmentation: 'none' (the VTAB-1k recipe) or 'vpt' (VPT's FGVC recipe,
    `augment.CropFlipSource`: shorter side to 256/224 S, then a random S crop
    and a horizontal flip for training, the centre S crop for evaluation).
"""
import dataclasses
import os

import ml_collections

from synqt_jax import errors
from synqt_jax.config import fields as config_fields
from synqt_jax.data import augment
from synqt_jax.data import folders
from synqt_jax.data import preprocess
from synqt_jax.data import sources
from synqt_jax.data import tasks


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """The data config with the reference's defaults, updated by `overrides`."""
  defaults = config_fields.DATA_DEFAULTS
  unknown = set(overrides) - set(defaults)
  if unknown:
    raise errors.DataConfigError(f'Unknown data config fields '
                                 f'{sorted(unknown)}; the fields are '
                                 f'{list(defaults)}.')
  return ml_collections.ConfigDict({**defaults, **overrides})


def validate_data_config(config) -> None:
  """Raises DataConfigError naming the first field with a bad value."""
  def field(name):
    if not hasattr(config, name):
      raise errors.DataConfigError(f'data.{name} is missing.')
    return getattr(config, name)

  kind = sources.kind(field('source'))
  if kind is None:
    raise errors.DataConfigError(
        f'data.source={config.source!r}; expected one of '
        f'{tuple(sources.SOURCES)}.')
  field('task')
  task = _task(config)
  kind.check_task(task)
  root = field('root')
  if not (isinstance(root, (str, os.PathLike)) and os.fspath(root) or
          root is None and kind.root_optional):
    raise errors.DataConfigError(
        f'data.root={root!r}; expected the prepared-folder root (a path), or '
        'for TFDS a data_dir or None (TFDS\'s default).')
  image_size = field('image_size')
  if not (isinstance(image_size, int) and not isinstance(image_size, bool)
          and image_size > 0):
    raise errors.DataConfigError(
        f'data.image_size={image_size!r}; expected a positive int (224).')
  if field('normalization') != preprocess.AUTO_NORMALIZATION:
    preprocess.check_normalization(config.normalization)
  n = config.get('num_classes')
  if not (n is None or isinstance(n, int) and not isinstance(n, bool) and n > 1):
    raise errors.DataConfigError(
        f'data.num_classes={n!r}; expected None (from the task or the data) '
        'or an int >= 2 (a classifier needs two classes or more).')
  augmentation = augment.augmentation(config)
  if augmentation not in augment.AUGMENTATIONS:
    raise errors.DataConfigError(f'data.augmentation={augmentation!r}; '
                                 f'expected one of {augment.AUGMENTATIONS}.')
  splits = {'train_split': field('train_split'),
            'test_split': field('test_split'),
            'val_split': getattr(config, 'val_split', None)}
  for name, split in splits.items():
    if split is None and name == 'val_split':
      continue
    if not (isinstance(split, str) and split):
      raise errors.DataConfigError(
          f'data.{name}={split!r}; expected a split name.')
    kind.check_split(name, split, task)


def _task(config) -> tasks.Task:
  """The registered task `config.task` names, or (folders) a task of its own."""
  try:
    return tasks.get_task(config.task)
  except tasks.UnknownTaskError as e:
    if _reads_own_tasks(config.source) and isinstance(config.root, str):
      # num_classes=0: not known yet; task_of reads it from the data.
      own = tasks.Task(name=str(config.task), num_classes=0,
                       folder_names=(str(config.task),))
      if folders.has_task(config.root, own, config.train_split):
        return own
      if os.path.basename(os.path.normpath(config.root)) == own.name:
        # The task's own directory (configs/folder.py): say what it lacks.
        folders.split_paths(config.root, own, config.train_split)
    raise errors.DataConfigError(
        f'data.task: {e} Your own data: data.source=\'folder\' with data.root '
        'holding <task>/<split>.txt lists or <task>/<split>/<class name>/ '
        'images.') from e


def _splits(config) -> list[str]:
  return [split for split in (config.train_split, config.get('val_split'),
                              config.test_split) if split]


def task_of(config) -> tasks.Task:
  """The task of data config `config`, with its number of classes.

  data.num_classes wins; else a registered task's count; else (your own
  folder task) what the data shows (`folders.count_classes`).
  """
  task = _task(config)
  n = config.get('num_classes') or task.num_classes or folders.count_classes(
      config.root, task, _splits(config))
  return dataclasses.replace(task, num_classes=n)


def num_classes(config) -> int:
  """The number of classes of the task in data config `config` (see task_of).

  An export's data config (task, num_classes) is enough where it has them.
  """
  if config.get('num_classes'):
    return config.num_classes
  if not _reads_own_tasks(config.get('source')):  # Also an old export's.
    return tasks.get_task(config.task).num_classes
  validate_data_config(config)
  return task_of(config).num_classes


def class_names(config):
  """The class names of a folder task where the data has them (ImageFolder), or None."""
  if not _reads_own_tasks(config.source):
    return None
  names = folders.class_names(config.root, _task(config), config.train_split)
  return list(names) if names is not None else None


def _reads_own_tasks(source) -> bool:
  """Whether data.source `source` (None in an old export) reads tasks of its own."""
  kind = sources.kind(source)
  return kind is not None and kind.reads_own_tasks


def load_source(config, split: str, *,
                in_memory: bool = False) -> sources.Source:
  """The `split` of the task in data config `config`.

  Args:
    config: data config (see the module docstring).
    split: split name, e.g. config.train_split.
    in_memory: decode and resize every example now (with a progress bar) and
      keep them as uint8; meant for the ~1000 training images.

  Raises:
    DataConfigError (bad field, unknown task or split), TfdsNotPreparedError
    (with the steps to prepare), and folders' errors for missing or bad
    folders, split files, images and labels.
  """
  validate_data_config(config)
  task = task_of(config)
  augmented = augment.augmentation(config) == 'vpt'
  size, resize_fn = ((round(config.image_size * augment.VPT_RESIZE_RATIO),
                      preprocess.resize_shorter_side) if augmented
                     else (config.image_size, preprocess.resize))
  source = sources.kind(config.source).open(
      task, split, config.root, size, resize_fn,
      training=split == config.train_split)
  source = sources.cache_in_memory(source) if in_memory else source
  if augmented:
    return augment.CropFlipSource(source, config.image_size)
  return source
