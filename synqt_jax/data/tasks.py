"""Registry of the VTAB-1k and FGVC tasks: names, class counts, splits, labels.

Splits and label functions reproduce google-research/task_adaptation (the VTAB
reference), so TFDS-read data matches the NOAH/VPT prepared folders the
PyTorch reference trains on. FGVC tasks exist only as prepared folders.

Every task is reachable under its canonical name (`VTAB_TASKS`, `FGVC_TASKS`)
and under the aliases people use: TFDS builder names (`svhn_cropped`), the
NOAH folder names (`cifar`, `kitti`) and VPT's names (`CUB`, `StanfordCars`).
"""

import dataclasses
import difflib
import functools
from typing import Any, Callable, Mapping

import numpy as np

from synqt_jax import errors

# VTAB-1k split names; FGVC folders use 'train', 'val' and 'test'.
VTAB_SPLITS = ('train800', 'val200', 'train800val200', 'test')

# One decoded TFDS example, as `tfds.data_source` returns it.
Example = Mapping[str, Any]

# task_adaptation's bins: label = the largest i with thresholds[i] < value.
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE_DISTANCE = 1000.0
KITTI_VEHICLE_TYPES = 3  # kitti objects/type < 3: Car, Van, Truck.


class UnknownTaskError(errors.UserError, ValueError):
  """A task name that is neither a canonical name nor an alias."""


class LabelOutOfRangeError(errors.UserError, ValueError):
  """A label outside 0..num_classes-1: wrong task for the data, or bad data."""


def check_label(label: int, num_classes: int, where: str) -> int:
  """Returns `label`, or raises naming where it came from and the range."""
  if not 0 <= label < num_classes:
    raise LabelOutOfRangeError(
        f'{where}: label {label} is outside the valid range '
        f'0..{num_classes - 1} ({num_classes} classes). Check that the data '
        'belongs to the configured task (data.task) and that labels start '
        'at 0.')
  return label


def threshold_bin(value: float, thresholds) -> int:
  """Largest i with thresholds[i] < value, compared in float32 like TF did."""
  thresholds = np.asarray(thresholds, np.float32)
  return int(np.searchsorted(thresholds, np.float32(value), side='left')) - 1


def clevr_count_label(example: Example) -> int:
  """Number of objects - 3 (CLEVR scenes hold 3 to 10 objects)."""
  return len(example['objects']['size']) - 3


def clevr_distance_label(example: Example) -> int:
  """Bin of the depth of the closest object."""
  depth = np.asarray(example['objects']['pixel_coords'], np.float32)[:, 2]
  return threshold_bin(depth.min(), CLEVR_DISTANCE_THRESHOLDS)


def kitti_distance_label(example: Example) -> int:
  """Bin of the depth of the closest vehicle; 3 when there is none."""
  objects = example['objects']
  depth = np.asarray(objects['location'], np.float32).reshape(-1, 3)[:, 2]
  vehicle_depth = depth[np.asarray(objects['type']) < KITTI_VEHICLE_TYPES]
  closest = np.min(np.append(vehicle_depth, KITTI_NO_VEHICLE_DISTANCE))
  return threshold_bin(closest, KITTI_DISTANCE_THRESHOLDS)


def attribute_label(example: Example, key: str, bin_width: float = 1) -> int:
  """A class-label feature other than 'label', optionally coarsened."""
  return int(np.float32(example[key]) // np.float32(bin_width))


def class_label(example: Example) -> int:
  return int(example['label'])


def rgb_image(example: Example) -> np.ndarray:
  return example['image']


def binary_image(example: Example) -> np.ndarray:
  """dSprites stores 0/1 pixels; task_adaptation scales them to 0/255."""
  return example['image'] * np.uint8(255)


@dataclasses.dataclass(frozen=True)
class Task:
  """One classification task and everything needed to read its data.

  Attributes:
    name: canonical name.
    num_classes: number of classes.
    folder_names: directory names the task has under a prepared-folder root.
    aliases: other accepted names.
    tfds_name: 'builder[/config]:version' or None for folder-only tasks.
    tfds_splits: VTAB split name -> TFDS split expression.
    label_fn: decoded TFDS example -> label.
    image_fn: decoded TFDS example -> uint8 image (grayscale is tiled later).
    tfds_prepare_requires: pip packages that TFDS needs to build the dataset.
    tfds_manual_download: steps to fetch files TFDS cannot download itself.
    image_dir: FGVC JSON: directory that image paths are relative to.
  """
  name: str
  num_classes: int
  folder_names: tuple[str, ...] = ()
  aliases: tuple[str, ...] = ()
  tfds_name: str | None = None
  tfds_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)
  label_fn: Callable[[Example], int] = class_label
  image_fn: Callable[[Example], np.ndarray] = rgb_image
  tfds_prepare_requires: tuple[str, ...] = ()
  tfds_manual_download: str = ''
  image_dir: str = ''

  @property
  def is_vtab(self) -> bool:
    return self.tfds_name is not None


def _vtab_splits(val200: str, test: str) -> dict[str, str]:
  return {'train800': 'train[:800]', 'val200': val200,
          'train800val200': f'train[:800]+{val200}', 'test': test}


def _vtab(name, num_classes, tfds_name, val200, test, folder_names=None,
          **kwargs) -> Task:
  return Task(name=name, num_classes=num_classes, tfds_name=tfds_name,
              tfds_splits=_vtab_splits(val200, test),
              folder_names=folder_names or (name,), **kwargs)


_RESISC45_MANUAL = (
    'Download NWPU-RESISC45.rar '
    '(https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs, linked from '
    'https://www.tensorflow.org/datasets/catalog/resisc45) and extract it '
    'into <manual_dir> (`unrar x NWPU-RESISC45.rar <manual_dir>/`) so that '
    '<manual_dir>/NWPU-RESISC45/<class name>/*.jpg exist.')
_RETINOPATHY_MANUAL = (
    'Accept the rules at '
    'https://www.kaggle.com/c/diabetic-retinopathy-detection/data and '
    'download the files (`kaggle competitions download -c '
    'diabetic-retinopathy-detection`). In <manual_dir>: extract the split '
    'archives with `7z x train.zip.001` and `7z x test.zip.001` (giving '
    'train/ and test/ with the .jpeg files), `unzip sample.zip` (sample/) '
    'and `unzip trainLabels.csv.zip` (trainLabels.csv). TFDS downloads the '
    'test labels itself.')

_TASK_LIST = (
    # VTAB-1k natural.
    _vtab('caltech101', 102, 'caltech101:3.*.*', 'train[2754:2954]', 'test'),
    _vtab('cifar100', 100, 'cifar100:3.*.*', 'train[45000:45200]', 'test',
          folder_names=('cifar', 'cifar100'), aliases=('cifar',)),
    _vtab('dtd', 47, 'dtd:3.*.*', 'validation[:200]', 'test'),
    _vtab('oxford_flowers102', 102, 'oxford_flowers102:2.*.*',
          'validation[:200]', 'test', aliases=('flowers102',),
          tfds_prepare_requires=('scipy',)),
    # task_adaptation used 3.*.*, which current TFDS no longer builds; 4.0.0
    # has the same splits and fixes corrupt images.
    _vtab('oxford_iiit_pet', 37, 'oxford_iiit_pet:4.*.*', 'train[2944:3144]',
          'test', aliases=('pets', 'oxford_pet')),
    _vtab('svhn', 10, 'svhn_cropped:3.*.*', 'train[65931:66131]', 'test',
          aliases=('svhn_cropped',), tfds_prepare_requires=('scipy',)),
    _vtab('sun397', 397, 'sun397/tfds:4.*.*', 'validation[:200]', 'test',
          tfds_prepare_requires=('opencv-python-headless',)),
    # VTAB-1k specialized.
    _vtab('patch_camelyon', 2, 'patch_camelyon:2.*.*', 'validation[:200]',
          'test', aliases=('pcam',), tfds_prepare_requires=('h5py',)),
    _vtab('eurosat', 10, 'eurosat/rgb:2.*.*', 'train[16200:16400]',
          'train[21600:]'),
    _vtab('resisc45', 45, 'resisc45:3.*.*', 'train[18900:19100]',
          'train[25200:]', tfds_manual_download=_RESISC45_MANUAL),
    _vtab('diabetic_retinopathy', 5,
          'diabetic_retinopathy_detection/btgraham-300:3.*.*',
          'validation[:200]', 'test',
          aliases=('diabetic_retinopathy_detection', 'retinopathy'),
          tfds_prepare_requires=('opencv-python-headless',),
          tfds_manual_download=_RETINOPATHY_MANUAL),
    # VTAB-1k structured.
    _vtab('clevr_count', 8, 'clevr:3.*.*', 'train[63000:63200]', 'validation',
          aliases=('clevr_count_all',), label_fn=clevr_count_label),
    _vtab('clevr_dist', 6, 'clevr:3.*.*', 'train[63000:63200]', 'validation',
          aliases=('clevr_closest_object_distance', 'clevr_distance'),
          label_fn=clevr_distance_label),
    _vtab('dmlab', 6, 'dmlab:2.0.1', 'validation[:200]', 'test'),
    # kitti:3.1.0 as task_adaptation pins it (TFDS still builds it; 3.2.0
    # updated the devkit, 3.3.0 added `occluded` labels).
    _vtab('kitti_dist', 4, 'kitti:3.1.0', 'validation[:200]', 'test',
          folder_names=('kitti', 'kitti_dist'),
          aliases=('kitti', 'kitti_closest_vehicle_distance', 'kitti_distance'),
          label_fn=kitti_distance_label,
          tfds_prepare_requires=('opencv-python-headless',)),
    _vtab('dsprites_loc', 16, 'dsprites:2.*.*', 'train[589824:590024]',
          'train[663552:]', aliases=('dsprites_location', 'dsprites_x'),
          label_fn=functools.partial(
              attribute_label, key='label_x_position', bin_width=32 / 16),
          image_fn=binary_image, tfds_prepare_requires=('h5py',)),
    _vtab('dsprites_ori', 16, 'dsprites:2.*.*', 'train[589824:590024]',
          'train[663552:]', aliases=('dsprites_orientation',),
          label_fn=functools.partial(
              attribute_label, key='label_orientation', bin_width=40 / 16),
          image_fn=binary_image, tfds_prepare_requires=('h5py',)),
    _vtab('smallnorb_azi', 18, 'smallnorb:2.*.*', 'test[:200]', 'test[50%:]',
          aliases=('smallnorb_azimuth',),
          label_fn=functools.partial(attribute_label, key='label_azimuth')),
    _vtab('smallnorb_ele', 9, 'smallnorb:2.*.*', 'test[:200]', 'test[50%:]',
          aliases=('smallnorb_elevation',),
          label_fn=functools.partial(attribute_label, key='label_elevation')),
    # FGVC, as prepared by VPT (folders only).
    Task('cub200', 200, folder_names=('CUB_200_2011', 'cub200', 'cub'),
         aliases=('cub', 'cub_200_2011', 'cub200_2011'), image_dir='images'),
    Task('nabirds', 555, folder_names=('nabirds',), image_dir='images'),
    Task('oxford_flowers', 102, folder_names=('OxfordFlower', 'oxford_flowers'),
         aliases=('fgvc_flowers', 'oxfordflowers', 'oxfordflower')),
    Task('stanford_dogs', 120, folder_names=('Stanford-dogs', 'stanford_dogs'),
         aliases=('stanforddogs',), image_dir='Images'),
    Task('stanford_cars', 196, folder_names=('Stanford-cars', 'stanford_cars'),
         aliases=('stanfordcars',)),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
VTAB_TASKS = tuple(task.name for task in _TASK_LIST if task.is_vtab)
FGVC_TASKS = tuple(task.name for task in _TASK_LIST if not task.is_vtab)


def _normalize_name(name: str) -> str:
  return name.strip().lower().replace('-', '_').replace(' ', '_')


_TASK_BY_NAME = {
    _normalize_name(name): task
    for task in _TASK_LIST for name in (task.name,) + task.aliases}


def get_task(name: str) -> Task:
  """The task called `name` (canonical name or alias, any case)."""
  key = _normalize_name(str(name))
  if key in _TASK_BY_NAME:
    return _TASK_BY_NAME[key]
  close = difflib.get_close_matches(key, _TASK_BY_NAME, n=1)
  hint = f' Did you mean {_TASK_BY_NAME[close[0]].name!r}?' if close else ''
  raise UnknownTaskError(
      f'Unknown task {name!r}.{hint} Valid tasks: VTAB-1k: '
      f'{", ".join(VTAB_TASKS)}; FGVC: {", ".join(FGVC_TASKS)} '
      '(aliases such as cifar, kitti, svhn_cropped, CUB are accepted too).')
