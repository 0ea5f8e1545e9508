"""Input pipeline: a task's splits as image sources, and batches for training.

Data config (a ConfigDict, `config.data` in the trainer; `default_data_config`
builds one):
  source: 'tfds' (TFDS builders read with `tfds.data_source`) or 'folder'
    (prepared image folders, see folders.py).
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
    or 'auto' (what the checkpoint records, see resolve_normalization).
  train_split: 'train800val200' (VTAB) or 'train' / 'train+val' (FGVC).
  test_split: 'test'.
  val_split: 'val200' (VTAB), 'val' (FGVC) or None.
  augmentation: 'none' (the VTAB-1k recipe) or 'vpt' (VPT's FGVC recipe,
    `CropFlipSource`: shorter side to 256/224 S, then a random S crop and a
    horizontal flip for training, the centre S crop for evaluation).

Images are resized once, with PIL bicubic straight to S x S (bit-identical to
the reference's torchvision Resize((S, S)) on PIL images), kept as uint8, and
normalised per batch in float32.

The training stream is a function of (seed, step) alone: step k is batch
k % steps_per_epoch of epoch k // steps_per_epoch, whose example order is
np.random.default_rng([seed, epoch]).permutation(n). An epoch's last batch is
padded with mask=0 rows (PyTorch's drop_last=False), so `train_batches(...,
start_step=k)` resumes exactly and the step is the only state to checkpoint.
Every host yields its contiguous slice of the global batch, shaped
[local_devices, per_device, ...].
"""

import abc
import concurrent.futures
import dataclasses
import itertools
import os
import queue
import threading
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
import tqdm

from synqt_jax.weights import checkpoint
from synqt_jax.config import fields as config_fields
from synqt_jax import errors
from synqt_jax.data import folders
from synqt_jax.data import tasks

SOURCES = ('tfds', 'folder')
AUGMENTATIONS = ('none', 'vpt')
# VPT's FGVC recipe at 224: Resize(256), then a 224 crop (its transforms.py).
VPT_RESIZE_RATIO = 256 / 224
NORMALIZATIONS = ('imagenet', 'inception')
# data.normalization that the backbone's file decides (resolve_normalization).
AUTO_NORMALIZATION = 'auto'
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)

Batch = dict[str, np.ndarray]


class DataConfigError(errors.UserError, ValueError):
  """A data config field with a bad value; the message names the field."""


class TfdsNotPreparedError(errors.UserError, FileNotFoundError):
  """A TFDS dataset that is missing, or not in a random-access format."""


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """The data config with the reference's defaults, updated by `overrides`."""
  defaults = config_fields.DATA_DEFAULTS
  unknown = set(overrides) - set(defaults)
  if unknown:
    raise DataConfigError(f'Unknown data config fields {sorted(unknown)}; '
                          f'the fields are {list(defaults)}.')
  return ml_collections.ConfigDict({**defaults, **overrides})


def validate_data_config(config) -> None:
  """Raises DataConfigError naming the first field with a bad value."""
  def field(name):
    if not hasattr(config, name):
      raise DataConfigError(f'data.{name} is missing.')
    return getattr(config, name)

  if field('source') not in SOURCES:
    raise DataConfigError(
        f'data.source={config.source!r}; expected one of {SOURCES}.')
  field('task')
  task = _task(config)
  if config.source == 'tfds' and not task.is_vtab:
    raise DataConfigError(
        f'data.source=\'tfds\', but task {task.name!r} has no TFDS builder; '
        'use data.source=\'folder\' with the VPT-prepared folder.')
  root = field('root')
  if not (isinstance(root, (str, os.PathLike)) and os.fspath(root) or
          root is None and config.source == 'tfds'):
    raise DataConfigError(
        f'data.root={root!r}; expected the prepared-folder root (a path), or '
        'for TFDS a data_dir or None (TFDS\'s default).')
  image_size = field('image_size')
  if not (isinstance(image_size, int) and not isinstance(image_size, bool)
          and image_size > 0):
    raise DataConfigError(
        f'data.image_size={image_size!r}; expected a positive int (224).')
  if field('normalization') != AUTO_NORMALIZATION:
    _check_normalization(config.normalization)
  n = config.get('num_classes')
  if not (n is None or isinstance(n, int) and not isinstance(n, bool) and n > 1):
    raise DataConfigError(f'data.num_classes={n!r}; expected None (from the task '
                          'or the data) or an int >= 2 (a classifier needs two '
                          'classes or more).')
  augmentation = config.get('augmentation', 'none')
  if augmentation not in AUGMENTATIONS:
    raise DataConfigError(f'data.augmentation={augmentation!r}; expected one '
                          f'of {AUGMENTATIONS}.')
  splits = {'train_split': field('train_split'),
            'test_split': field('test_split'),
            'val_split': getattr(config, 'val_split', None)}
  for name, split in splits.items():
    if split is None and name == 'val_split':
      continue
    if not (isinstance(split, str) and split):
      raise DataConfigError(f'data.{name}={split!r}; expected a split name.')
    if config.source == 'tfds' and split not in task.tfds_splits:
      raise DataConfigError(
          f'data.{name}={split!r}; TFDS tasks have the splits '
          f'{tuple(task.tfds_splits)}.')


def resize(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: PIL bicubic straight to size x size.

  This is what torchvision's Resize((size, size), BICUBIC) does to a PIL
  image, so the result is bit-identical to the reference's inputs.

  Args:
    image: a PIL image of any mode (`folders.to_rgb`), or a uint8 array
      [H, W], [H, W, 1] or [H, W, 3] (grayscale is tiled to 3 channels).
    size: output side.
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(_rgb(image))
  return np.asarray(folders.to_rgb(image).resize((size, size), Image.BICUBIC))


def resize_shorter_side(image: Image.Image | np.ndarray, size: int
                        ) -> np.ndarray:
  """uint8 [size, size, 3]: PIL bilinear, shorter side to `size`, centre square.

  torchvision's Resize(size) (VPT's FGVC recipe) keeps the aspect ratio; the
  centre square of that image is kept, so the random crops of
  `CropFlipSource` range over it (VPT's range over the whole longer side) and
  its centre crops are VPT's CenterCrop (to a pixel where the longer side's
  margin is odd).
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(_rgb(image))
  image = folders.to_rgb(image)
  width, height = image.size
  scale = size / min(width, height)
  # torchvision's rounding: the shorter side exactly `size`, the other int().
  new = ((size, int(height * scale)) if width <= height
         else (int(width * scale), size))
  image = np.asarray(image.resize(new, Image.BILINEAR))
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
  """float32 images from uint8 ones, with the reference's float32 arithmetic."""
  _check_normalization(normalization)
  images = images.astype(np.float32)  # In place from here on: big batches.
  if normalization == 'imagenet':
    images /= 255
    images -= IMAGENET_MEAN
    images /= IMAGENET_STD
  else:
    images -= 127.5
    images /= 127.5
  return images


def resolve_normalization(config):
  """`config` (a training config) with data.normalization='auto' replaced by
  the normalisation its backbone checkpoint records (convert.py writes it)."""
  if config.data.normalization != AUTO_NORMALIZATION:
    return config
  c = config.backbone
  recorded = checkpoint.file_metadata(c.source, c.collection, c.cache_dir).get(
      'normalization')
  if recorded is None:
    raise DataConfigError(
        f"data.normalization='auto', but {c.source!r} records no input "
        "normalisation; set data.normalization='inception' ([-1, 1], Google's "
        "ViT) or 'imagenet' (ImageNet mean/std: DINOv2, timm, the SynQT "
        'reference), or convert the file with python -m synqt_jax.convert.')
  config = config.copy_and_resolve_references()
  config.data.normalization = recorded
  return config


def _check_normalization(normalization: str) -> None:
  if normalization == AUTO_NORMALIZATION:
    raise DataConfigError(
        "data.normalization='auto' must be resolved from the checkpoint first "
        '(resolve_normalization).')
  if normalization not in NORMALIZATIONS:
    raise DataConfigError(f'data.normalization={normalization!r}; expected '
                          f'one of {NORMALIZATIONS}.')


def _rgb(image: np.ndarray) -> np.ndarray:
  if image.dtype != np.uint8:
    raise ValueError(f'Expected uint8 image, got {image.dtype}.')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f'Expected an image [H, W], [H, W, 1] or [H, W, 3], got {image.shape}.')
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


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
      self._images = np.stack([resize(image, image_size) for image in images])
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
               resize_fn=resize):
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
               image_size: int, resize_fn=resize):
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


def _task(config) -> tasks.Task:
  """The registered task `config.task` names, or (folders) a task of its own."""
  try:
    return tasks.get_task(config.task)
  except tasks.UnknownTaskError as e:
    if config.source == 'folder' and isinstance(config.root, str):
      # num_classes=0: not known yet; task_of reads it from the data.
      own = tasks.Task(name=str(config.task), num_classes=0,
                       folder_names=(str(config.task),))
      if folders.has_task(config.root, own, config.train_split):
        return own
      if os.path.basename(os.path.normpath(config.root)) == own.name:
        # The task's own directory (configs/folder.py): say what it lacks.
        folders.split_paths(config.root, own, config.train_split)
    raise DataConfigError(
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
  if config.get('source') != 'folder':  # Also an old export's data config.
    return tasks.get_task(config.task).num_classes
  validate_data_config(config)
  return task_of(config).num_classes


def class_names(config):
  """The class names of a folder task where the data has them (ImageFolder), or None."""
  if config.source != 'folder':
    return None
  names = folders.class_names(config.root, _task(config), config.train_split)
  return list(names) if names is not None else None


def load_source(config, split: str, *, in_memory: bool = False) -> Source:
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
  augmented = config.get('augmentation', 'none') == 'vpt'
  size, resize_fn = ((round(config.image_size * VPT_RESIZE_RATIO),
                      resize_shorter_side) if augmented
                     else (config.image_size, resize))
  if config.source == 'folder':
    folder_split = folders.read_split(config.root, task, split)
    if split == config.train_split:
      folders.check_every_class_trains(folder_split)
    source = FolderSource(task, split, folder_split, size, resize_fn)
  else:
    data_source = _tfds_data_source(task, split, config.root)
    source = TfdsSource(task, split, data_source, size, resize_fn)
  source = cache_in_memory(source) if in_memory else source
  return CropFlipSource(source, config.image_size) if augmented else source


class CropFlipSource(Source):
  """VPT's FGVC views of a source of R x R images, at S x S (S < R).

  Indexing gives the centre crop (evaluation, and any fixed view);
  `augmented(index, rng)` a random crop, flipped left-right with probability
  1/2 (training: `train_batches` draws `rng` from (seed, step, example)).
  """

  def __init__(self, source: Source, image_size: int):
    super().__init__(source.name, source.num_classes, image_size)
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    image, label = self._source[index]
    start = (image.shape[0] - self.image_size) // 2
    return self._crop(image, start, start), label

  def augmented(self, index: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, int]:
    image, label = self._source[index]
    top, left = rng.integers(0, image.shape[0] - self.image_size + 1, 2)
    crop = self._crop(image, top, left)
    return (crop[:, ::-1] if rng.random() < 0.5 else crop), label

  def _crop(self, image, top, left):
    return image[top:top + self.image_size, left:left + self.image_size]


def training_view(source: Source, seed: int, step: int):
  """index -> (image, label) of training step `step`: augmented if `source` is.

  An augmented example's view is drawn from default_rng([seed, step, index]):
  a function of the step and the example alone, so resuming at any step
  yields the same views, on any number of hosts.
  """
  if not isinstance(source, CropFlipSource):
    return source.__getitem__
  return lambda index: source.augmented(
      index, np.random.default_rng([seed, step, int(index)]))


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


def _tfds_data_source(task: tasks.Task, split: str, data_dir: str | None):
  if split not in task.tfds_splits:
    raise DataConfigError(f'Split {split!r}: TFDS tasks have the splits '
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


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Batches in one pass over `num_examples`, the last one padded."""
  return -(-num_examples // global_batch)


def train_indices(num_examples: int, global_batch: int, seed: int,
                  step: int) -> np.ndarray:
  """Example indices of global training batch `step`; -1 marks padding."""
  epoch, batch = divmod(step, steps_per_epoch(num_examples, global_batch))
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return _pad(order[batch * global_batch:(batch + 1) * global_batch],
              global_batch)


def eval_indices(num_examples: int, global_batch: int, step: int) -> np.ndarray:
  """Example indices of global eval batch `step`, in order; -1 is padding."""
  stop = min(num_examples, (step + 1) * global_batch)
  return _pad(np.arange(step * global_batch, stop), global_batch)


def _pad(indices: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([indices, np.full(size - len(indices), -1)])


def train_batches(source: Source, global_batch: int, *, seed: int,
                  normalization: str = 'imagenet', start_step: int = 0,
                  num_steps: int | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  local_device_count: int | None = None,
                  prefetch: int = 2,
                  num_threads: int | None = None) -> Iterator[Batch]:
  """This host's training batches from global step `start_step` on.

  Args:
    source: the training split, best an in-memory one (`load_source(...,
      in_memory=True)`).
    global_batch: examples per step over all hosts and devices.
    seed: the order's seed (>= 0).
    normalization: 'imagenet' or 'inception'.
    start_step: first global step to yield; restarting here yields exactly
      what an uninterrupted stream yields from this step on.
    num_steps: how many batches to yield; None: forever.
    process_index, process_count, local_device_count: this host's place;
      default from jax.
    prefetch: batches prepared ahead in a background thread.
    num_threads: threads that decode examples (default: one per core).

  Returns:
    An iterator of {'image': float32 [D, b, S, S, 3], 'label': int32 [D, b],
    'mask': float32 [D, b]} with D local devices and b = global_batch /
    (process_count * D) examples per device; padding rows have mask 0.
  """
  if not (isinstance(seed, (int, np.integer)) and seed >= 0):
    raise ValueError(f'seed={seed!r}; expected an int >= 0.')
  steps = (itertools.count(start_step) if num_steps is None
           else range(start_step, start_step + num_steps))
  stream = ((train_indices(len(source), global_batch, seed, step),
             training_view(source, seed, step)) for step in steps)
  return _batches(source, global_batch, stream, normalization, process_index,
                  process_count, local_device_count, prefetch, num_threads)


def eval_batches(source: Source, global_batch: int, *,
                 normalization: str = 'imagenet',
                 process_index: int | None = None,
                 process_count: int | None = None,
                 local_device_count: int | None = None,
                 prefetch: int = 2,
                 num_threads: int | None = None) -> Iterator[Batch]:
  """This host's batches of one in-order pass over `source`.

  Examples are decoded on the fly in background threads, so big test sets
  stream. The last batch is padded with mask=0 rows: summing over mask counts
  every example exactly once. Arguments and batches as for `train_batches`;
  there are steps_per_epoch(len(source), global_batch) of them.
  """
  stream = ((eval_indices(len(source), global_batch, step), source.__getitem__)
            for step in range(steps_per_epoch(len(source), global_batch)))
  return _batches(source, global_batch, stream, normalization, process_index,
                  process_count, local_device_count, prefetch, num_threads)


def _batches(source, global_batch, index_stream, normalization, process_index,
             process_count, local_device_count, prefetch, num_threads):
  """Checks the layout now, then assembles this host's batches lazily.

  `index_stream` yields (global batch indices, index -> example) per step.
  """
  layout = HostLayout.of(global_batch, process_index, process_count,
                         local_device_count)
  _check_normalization(normalization)
  if len(source) == 0:
    raise ValueError(f'{source.name} has no examples.')

  def host_batches():
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for indices, examples in index_stream:
        yield _host_batch(examples, source.image_size,
                          indices[layout.host_rows], layout, normalization,
                          pool)

  return prefetched(host_batches(), prefetch)


@dataclasses.dataclass(frozen=True)
class HostLayout:
  """This host's rows of a global batch, and their per-device shape."""
  host_rows: slice
  local_device_count: int

  @classmethod
  def of(cls, global_batch, process_index=None, process_count=None,
         local_device_count=None):
    """The layout of this host (defaults from jax), checked."""
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if local_device_count is None:
      local_device_count = jax.local_device_count()
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is not in '
                       f'0..{process_count - 1}.')
    if global_batch % (process_count * local_device_count):
      raise ValueError(
          f'Global batch {global_batch} does not split evenly over '
          f'{process_count} processes x {local_device_count} local devices; '
          f'use a multiple of {process_count * local_device_count}.')
    per_host = global_batch // process_count
    return cls(slice(process_index * per_host, (process_index + 1) * per_host),
               local_device_count)

  def per_device(self, arrays):
    """Host arrays (b, ...) as (devices, b / devices, ...)."""
    return {k: v.reshape((self.local_device_count, -1) + v.shape[1:])
            for k, v in arrays.items()}


def train_batch_spec(global_batch: int, image_size: int | None, *,
                     inputs: tuple[str, tuple[int, ...], Any] | None = None) -> Batch:
  """What each of `train_batches`' batches is, as jax.ShapeDtypeStruct leaves.

  So that the train step compiles before any data (or feature cache) exists.
  `inputs`: (name, per-example shape, dtype) in place of the float32 'image'
  (a feature cache's 'kv').
  """
  layout = HostLayout.of(global_batch)
  rows = layout.host_rows.stop - layout.host_rows.start
  per_device = (layout.local_device_count, rows // layout.local_device_count)
  name, shape, dtype = inputs or ('image', (image_size, image_size, 3), np.float32)
  return {name: jax.ShapeDtypeStruct(per_device + tuple(shape), dtype),
          'label': jax.ShapeDtypeStruct(per_device, np.int32),
          'mask': jax.ShapeDtypeStruct(per_device, np.float32)}


def _host_batch(examples, size, indices, layout, normalization, pool):
  """`examples`: index -> (uint8 [size, size, 3] image, label)."""
  images = np.zeros((len(indices), size, size, 3), np.uint8)
  labels = np.zeros(len(indices), np.int32)
  rows = np.flatnonzero(indices >= 0)
  for row, (image, label) in zip(rows, pool.map(examples, indices[rows])):
    images[row], labels[row] = image, label
  return layout.per_device({'image': normalize(images, normalization),
                            'label': labels,
                            'mask': (indices >= 0).astype(np.float32)})


def prefetched(iterator, size: int):
  """Runs `iterator` in a background thread, at most `size` items ahead.

  An item is made only while fewer than `size` wait (queued or being made):
  with the one the caller holds, at most `size` + 1 exist. `size` 0: no
  thread, each item made when asked.
  """
  return iterator if size == 0 else _made_in_a_thread(iterator, size)


def _made_in_a_thread(iterator, size):
  buffer = queue.Queue()
  slots = threading.Semaphore(size)
  stopped = threading.Event()
  end = object()

  def produce():
    try:
      while True:
        while not slots.acquire(timeout=0.1):
          if stopped.is_set():
            return
        if stopped.is_set():
          return
        item = next(iterator, end)
        buffer.put((item, None))
        if item is end:
          return
    except Exception as e:  # pylint: disable=broad-except
      buffer.put((None, e))
    finally:
      iterator.close()

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item, error = buffer.get()
      slots.release()
      if error is not None:
        raise error
      if item is end:
        return
      yield item
  finally:
    stopped.set()
    thread.join()
