"""Random access to a split's examples: in memory, prepared folders or TFDS.

A `Source` gives (uint8 [S, S, 3] image, int label) pairs by index.
`SOURCES` maps each `data.source` name to its `SourceKind`: how it opens a
task's split and what it asks of the data config; data_config.py asks it.
"""
import abc
import concurrent.futures
import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from synqt_jax import errors
from synqt_jax.data import folders
from synqt_jax.data import preprocess
from synqt_jax.data import tasks


class TfdsNotPreparedError(errors.UserError, FileNotFoundError):
  """A TFDS dataset that is missing, or not in a random-access format."""


class Source(abc.ABC):
  """Random access to one split: (uint8 [S, S, 3] image, int label) pairs."""

  def __init__(self, name: str, num_classes: int, image_size: int):
    self.name = name
    self.num_classes = num_classes
    self.image_size = image_size

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...

  def check_images(self) -> None:
    """Decodes every image once, so a bad one stops a run before training.

    Only prepared folders need it: arrays are decoded already and TFDS
    checks its records when it prepares them.
    """

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.name!r}, {len(self)} examples, '
            f'{self.num_classes} classes, {self.image_size}px)')


class ArraySource(Source):
  """Examples held in memory as numpy arrays (resized on construction)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
               *, image_size: int | None = None, name: str = 'arrays'):
    """Checks and resizes the examples.

    Args:
      images: uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3].
      labels: integers [N] in 0..num_classes-1.
      num_classes: number of classes.
      image_size: side S to resize to; None keeps the (square) input size.
      name: shown in messages.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(f'{name}: expected uint8 images [N, H, W(, C)], got '
                       f'{images.dtype} {images.shape}.')
    if labels.shape != images.shape[:1] or labels.dtype.kind not in 'iu':
      raise ValueError(f'{name}: expected integer labels [{len(images)}], got '
                       f'{labels.dtype} {labels.shape}.')
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
      tasks.check_label(int(labels[bad[0]]), num_classes,
                        f'{name} labels[{bad[0]}]')
    if image_size is None:
      if images.shape[1] != images.shape[2]:
        raise ValueError(f'{name}: images {images.shape[1:3]} are not square; '
                         'pass image_size to resize them.')
      image_size = images.shape[1]
    if images.shape[1:] == (image_size, image_size, 3):
      self._images = images
    else:
      self._images = np.stack([preprocess.resize(image, image_size)
                               for image in images])
    self._labels = labels.astype(np.int32)
    super().__init__(name, num_classes, image_size)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self._images[index], int(self._labels[index])


class FolderSource(Source):
  """A checked prepared-folder split, decoded and resized on access."""

  def __init__(self, task: tasks.Task, split: str,
               folder_split: folders.FolderSplit, image_size: int,
               resize_fn=preprocess.resize):
    super().__init__(f'{task.name}:{split}', task.num_classes, image_size)
    self._split = folder_split
    self._resize = resize_fn

  def __len__(self) -> int:
    return len(self._split)

  def check_images(self) -> None:
    folders.check_images(self._split, self.name)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    image = folders.load_image(self._split.paths[index],
                               self._split.origins[index])
    return self._resize(image, self.image_size), int(self._split.labels[index])


class TfdsSource(Source):
  """A TFDS random-access split with the task's image and label functions."""

  def __init__(self, task: tasks.Task, split: str, data_source,
               image_size: int, resize_fn=preprocess.resize):
    super().__init__(f'{task.name}:{split}', task.num_classes, image_size)
    self._resize = resize_fn
    self._task = task
    self._data_source = data_source
    self._origin = f'TFDS {task.tfds_name} split {task.tfds_splits[split]!r}'

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    example = self._data_source[int(index)]
    label = tasks.check_label(self._task.label_fn(example), self.num_classes,
                              f'{self._origin} example {index}')
    return self._resize(self._task.image_fn(example), self.image_size), label


def cache_in_memory(source: Source, num_threads: int | None = None
                    ) -> ArraySource:
  """Decodes and resizes every example of `source` once, with a progress bar."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    examples = list(tqdm.tqdm(pool.map(source.__getitem__, range(len(source))),
                              total=len(source), desc=f'Decoding {source.name}',
                              unit='images'))
  images = np.stack([image for image, _ in examples])
  labels = np.array([label for _, label in examples], np.int32)
  return ArraySource(images, labels, source.num_classes,
                     image_size=source.image_size, name=source.name)


class SourceKind(abc.ABC):
  """One `data.source`: how it opens a task's split, and what it can read."""
  # Whether data.root None stands for the reader's default place.
  root_optional = False
  # Whether a task name tasks.py does not know is a task of the data's own
  # (its classes counted from the data, ImageFolder's class names kept).
  reads_own_tasks = False

  @abc.abstractmethod
  def open(self, task: tasks.Task, split: str, root, image_size: int,
           resize_fn, training: bool = False) -> Source:
    """The `split` of `task` under `root`, resized by `resize_fn`;
    `training`: it is the split the run trains on."""

  def check_task(self, task: tasks.Task) -> None:
    """Raises DataConfigError if this source holds no data of `task`."""

  def check_split(self, field: str, split: str, task: tasks.Task) -> None:
    """Raises DataConfigError if `task` has no `split` here (data.<field>)."""


class _Tfds(SourceKind):
  """TFDS builders, read with `tfds.data_source`: the VTAB tasks."""
  root_optional = True  # TFDS's default data_dir.

  def open(self, task, split, root, image_size, resize_fn, training=False):
    del training  # TFDS's registered splits hold every class.
    return TfdsSource(task, split, _tfds_data_source(task, split, root),
                      image_size, resize_fn)

  def check_task(self, task):
    if not task.is_vtab:
      raise errors.DataConfigError(
          f'data.source=\'tfds\', but task {task.name!r} has no TFDS builder; '
          'use data.source=\'folder\' with the VPT-prepared folder.')

  def check_split(self, field, split, task):
    if split not in task.tfds_splits:
      raise errors.DataConfigError(
          f'data.{field}={split!r}; TFDS tasks have the splits '
          f'{tuple(task.tfds_splits)}.')


class _Folders(SourceKind):
  """Prepared image folders (folders.py): registered tasks, or your own."""
  reads_own_tasks = True

  def open(self, task, split, root, image_size, resize_fn, training=False):
    folder_split = folders.read_split(root, task, split)
    if training:  # A class without training images cannot be learned.
      folders.check_every_class_trains(folder_split)
    return FolderSource(task, split, folder_split, image_size, resize_fn)


SOURCES = {'tfds': _Tfds(), 'folder': _Folders()}


def kind(name) -> SourceKind | None:
  """The SourceKind a `data.source` value names, or None if it names none."""
  return SOURCES.get(name) if isinstance(name, str) else None


def _tfds_data_source(task: tasks.Task, split: str, data_dir: str | None):
  if split not in task.tfds_splits:
    raise errors.DataConfigError(f'Split {split!r}: TFDS tasks have the splits '
                                 f'{tuple(task.tfds_splits)}.')
  builder = tfds.builder(task.tfds_name, data_dir=data_dir)
  try:
    return builder.as_data_source(split=task.tfds_splits[split])
  except NotImplementedError as e:
    # TFDS says "no random access for TFRECORD" both for data prepared as
    # tfrecord and for data not prepared at all; tell the two apart.
    if builder.is_prepared():
      raise TfdsNotPreparedError(
          f'TFDS dataset {task.tfds_name!r} in {builder.data_dir} is prepared '
          'as tfrecord, but random access (tfds.data_source) needs '
          'array_record. Convert it once, without downloading again (the tfds '
          'command line needs `pip install tensorflow-cpu apache-beam '
          f'mlcroissant`):\n  tfds convert_format --dataset_version_dir='
          f'{builder.data_dir} --out_file_format=array_record') from e
    raise TfdsNotPreparedError(_tfds_prepare_message(task, builder)) from e


def _tfds_prepare_message(task: tasks.Task, builder) -> str:
  data_dir = os.fspath(builder.data_dir_root)
  spec = f'{task.tfds_name.split(":")[0]}:{builder.version}'
  steps = [f'pip install tensorflow-cpu {" ".join(task.tfds_prepare_requires)}'
           .strip()]
  if task.tfds_manual_download:
    manual_dir = os.path.join(data_dir, 'downloads', 'manual')
    steps.append('Manual download: ' + task.tfds_manual_download.replace(
        '<manual_dir>', manual_dir))
  steps.append(
      'python -c "import tensorflow_datasets as tfds; '
      f'tfds.builder(\'{spec}\', data_dir=\'{data_dir}\', '
      'file_format=\'array_record\').download_and_prepare()"'
      '\n     or, with the tfds command line (which also needs '
      '`pip install apache-beam mlcroissant`):\n     '
      f'tfds build {spec} --data_dir={data_dir} --file_format=array_record')
  numbered = ''.join(f'\n  {i}. {step}' for i, step in enumerate(steps, 1))
  return (
      f'TFDS dataset {spec} (task {task.name!r}) is not prepared in data_dir '
      f'{data_dir}. Prepare it once (TensorFlow is needed only for this):'
      f'{numbered}\narray_record is the format that tfds.data_source reads. '
      'Or set data.source=\'folder\' to read NOAH/VPT prepared folders.')
