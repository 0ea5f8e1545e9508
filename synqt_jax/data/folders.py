"""Readers for prepared image folders, the form most PETL users have on disk.

The layout is detected from the split file that exists:

  NOAH/VPT lists  <root>/<task>/<split>.txt, lines '<image path> <label>',
                  paths relative to <root>/<task>/.
  ImageFolder     <root>/<task>/<split>/<class name>/**/*.{jpg,png,...}, as
                  torchvision's ImageFolder: labels are the class names in
                  sorted order. The classes are those of all the split
                  directories together (torchvision's when every split holds
                  every class, consistent labels when one does not); each
                  needs training images, and there must be two or more.
                  Symlinked directories are followed, except back into a
                  directory read already (a loop) or into or above another
                  class directory (a warning each). Only where no split
                  file exists.
  SynQT JSON      <root>/<task>/<split>.json, [{"<image path>": <label>}, ...],
                  paths relative to <root>/<task>/images/.
  VPT FGVC JSON   <root>/<split>.json, {"<image path>": <class id>, ...}, paths
                  relative to the task's image directory (CUB-200-2011 and
                  NABirds: images/, Stanford Dogs: Images/, Stanford Cars and
                  Oxford Flowers: the root itself). Class ids become 0..C-1 in
                  sorted order. VPT sorts each split file's ids on their own;
                  we sort the ids of train/val/test.json together, which gives
                  the same labels when every split holds every class and
                  consistent ones when it does not.

<task> may be any of the task's folder names (e.g. cifar or cifar100), or
`root` may be the task's directory itself. A name that is not a registered
task is a task of its own (its class count read from the data, see
`count_classes`). Split 'a+b' concatenates splits a
and b (e.g. FGVC 'train+val'). Splits are checked when read (every image
exists, every label is in range), so bad data fails before training starts.
"""

import concurrent.futures
import dataclasses
import json
import os
from typing import Iterator, NamedTuple

from absl import logging
import numpy as np
from PIL import Image
import tqdm

from synqt_jax import errors
from synqt_jax.data import tasks

SPLIT_FILE_EXTENSIONS = ('.txt', '.json')
# The image files an ImageFolder class directory holds (torchvision's list).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                    '.tiff', '.webp')
# The files whose class ids together define the FGVC id -> label mapping.
FGVC_SPLIT_FILES = ('train.json', 'val.json', 'test.json')
# Splits at least this large show a progress bar while `check_images` runs.
LARGE_SPLIT = 1000


class FolderNotFoundError(errors.UserError, FileNotFoundError):
  """The root, or the task's split file under it, does not exist."""


class SplitFileError(errors.UserError, ValueError):
  """A split file that cannot be parsed, or an ambiguous layout."""


class MissingImageError(errors.UserError, FileNotFoundError):
  """A split file names an image that does not exist."""


class CorruptImageError(errors.UserError, ValueError):
  """An image file that PIL cannot decode."""


class _Entry(NamedTuple):
  path: str    # absolute image path
  label: int
  origin: str  # where the entry is written, for error messages


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """A checked split: every image exists and every label is in range."""
  paths: tuple[str, ...]
  labels: np.ndarray    # int32 [n]
  origins: tuple[str, ...]  # '<split file>:<line>' or '<split file> entry i'
  split_files: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)


def read_split(root: str, task: tasks.Task, split: str) -> FolderSplit:
  """Reads and checks `split` ('a+b' concatenates) of `task` under `root`."""
  split_files = split_paths(root, task, split)
  entries = [entry for path in split_files for entry in _read(path, task)]
  if not entries:
    raise SplitFileError(f'{" + ".join(split_files)} lists no images.')
  for entry in entries:
    tasks.check_label(entry.label, task.num_classes,
                      f'{entry.origin} (task {task.name!r})')
  missing = [entry for entry in entries if not os.path.isfile(entry.path)]
  if missing:
    others = (f' ({len(missing) - 1} more listed images are missing too)'
              if len(missing) > 1 else '')
    raise MissingImageError(
        f'{missing[0].origin}: image {missing[0].path} does not exist{others}. '
        'Extract the images next to the split file as the list expects, or '
        'fix data.root.')
  return FolderSplit(
      paths=tuple(entry.path for entry in entries),
      labels=np.array([entry.label for entry in entries], np.int32),
      origins=tuple(entry.origin for entry in entries),
      split_files=tuple(split_files))


def split_paths(root: str, task: tasks.Task, split: str) -> list[str]:
  """The split file or ImageFolder directory of each part of `split` ('a+b').

  Raises FolderNotFoundError (or SplitFileError) saying what is missing.
  """
  if not os.path.isdir(root):
    raise FolderNotFoundError(
        f'data.root {root!r} is not a directory. Point it at the folder that '
        'holds the prepared task directories (e.g. '
        f'<root>/{task.folder_names[0]}/test.txt), or use '
        'data.source=\'tfds\'.')
  return [find_split_file(root, task, part) for part in split.split('+')]


def find_split_file(root: str, task: tasks.Task, split: str) -> str:
  """Path of `split`'s list or JSON file for `task` under `root`.

  Where no candidate directory has one, the ImageFolder split directory
  `<directory>/<split>/` instead (one holding images but no class
  directories is an error).
  """
  candidates = _candidates(root, task)
  for directory in candidates:
    found = [os.path.join(directory, split + extension)
             for extension in SPLIT_FILE_EXTENSIONS]
    found = [path for path in found if os.path.isfile(path)]
    if len(found) > 1:
      raise SplitFileError(
          f'Both {found[0]} and {found[1]} exist; keep the one that matches '
          'the images so the layout is unambiguous.')
    if found:
      return found[0]
  for directory in candidates:
    split_directory = os.path.join(directory, split)
    if _class_directories(split_directory):
      return split_directory
    if _image_files_in(split_directory):
      raise FolderNotFoundError(
          f'{split_directory} holds images but no class directories; an '
          f'ImageFolder split is {split}/<class name>/<images>: move each '
          'class\'s images into a directory named after the class.')
  present = sorted(
      os.path.join(directory, name)
      for directory in candidates if os.path.isdir(directory)
      for name in os.listdir(directory)
      if name.endswith(SPLIT_FILE_EXTENSIONS))
  raise FolderNotFoundError(
      f'No split file {split}.txt or {split}.json, or ImageFolder directory '
      f'{split}/<class name>/, for task {task.name!r}; '
      f'looked in {", ".join(candidates)}. Split files present: '
      f'{", ".join(present) or "none"}. Check data.root and the split name.')


def _candidates(root: str, task: tasks.Task) -> list[str]:
  return [os.path.join(root, name) for name in task.folder_names] + [root]


def has_task(root: str, task: tasks.Task, split: str) -> bool:
  """Whether `root` holds `task`'s directory, or `split` of it directly."""
  try:
    return (any(os.path.isdir(os.path.join(root, name))
                for name in task.folder_names)
            or bool(find_split_file(root, task, split.split('+')[0])))
  except FolderNotFoundError:
    return False


def _image_files_in(directory: str) -> list[str]:
  """The image files directly in `directory` (none if it is not one)."""
  if not os.path.isdir(directory):
    return []
  return [name for name in os.listdir(directory)
          if name.lower().endswith(IMAGE_EXTENSIONS)
          and os.path.isfile(os.path.join(directory, name))]


def _class_directories(directory: str) -> list[str]:
  """Sorted names of the subdirectories of an ImageFolder split directory."""
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory)
                if os.path.isdir(os.path.join(directory, name)))


def image_folder_classes(split_directory: str) -> tuple[str, ...]:
  """The class names of an ImageFolder: those of every split beside this one."""
  parent = os.path.dirname(split_directory)
  return tuple(sorted({name for split in os.listdir(parent)
                       for name in _class_directories(os.path.join(parent, split))}))


def class_names(root: str, task: tasks.Task, split: str):
  """The class names of an ImageFolder task (label i is name i); None for lists."""
  path = find_split_file(root, task, split.split('+')[0])
  return image_folder_classes(path) if os.path.isdir(path) else None


def count_classes(root: str, task: tasks.Task, splits) -> int:
  """The number of classes the data of `splits` shows: ImageFolder class
  directories, or 1 + the largest label the split files list."""
  names = class_names(root, task, splits[0])
  if names is not None:
    count, shown = len(names), f'only the class directory {names[0]!r}'
  else:
    labels = [entry.label for split in splits for part in split.split('+')
              for entry in _read(find_split_file(root, task, part), task)]
    if not labels:
      raise SplitFileError(
          f'The splits {", ".join(splits)} of {root} list no images.')
    count, shown = max(labels) + 1, 'only the label 0'
  if count < 2:
    raise SplitFileError(
        f'The splits {", ".join(splits)} of {root} have {shown}: a classifier '
        'needs two classes or more (one class would score accuracy 1.0). Add '
        'the images of the other classes.')
  return count


def check_every_class_trains(split: FolderSplit) -> None:
  """Raises SplitFileError for an ImageFolder class with no image in `split`.

  `split` is the training split: a class without training images (an empty
  directory, or one in another split only) cannot be learned.
  """
  directories = [path for path in split.split_files if os.path.isdir(path)]
  if not directories:
    return
  classes = image_folder_classes(directories[0])
  trained = set(split.labels.tolist())
  missing = [name for label, name in enumerate(classes) if label not in trained]
  if missing:
    parent = os.path.dirname(directories[0])
    present = [os.path.join(parent, other, missing[0])
               for other in sorted(os.listdir(parent))
               if os.path.isdir(os.path.join(parent, other, missing[0]))]
    others = (f' ({len(missing) - 1} more classes have none either)'
              if len(missing) > 1 else '')
    raise SplitFileError(
        f'Class {missing[0]!r} has no training images in '
        f'{" + ".join(os.path.join(d, missing[0]) for d in directories)}'
        f'{others}; a class cannot be learned without them. Add its images '
        f'there, or remove {" and ".join(present)}.')


def load_image(path: str, origin: str = '') -> Image.Image:
  """Decodes an image file to RGB (`to_rgb`), as the reference's PIL loader does.

  Args:
    path: the image file.
    origin: where a split file lists it ('<split file>:<line>'); without one
      (an image given on the command line) the message does not mention
      split files.
  """
  try:
    with Image.open(path) as image:
      return to_rgb(image)
  except (OSError, SyntaxError, ValueError) as e:
    if origin:
      fix = (f' (listed at {origin}): {e}. Re-extract or re-download it, or '
             'remove it from the split file.')
    else:
      fix = f': {e}. Give an image file PIL can read (PNG, JPEG, ...).'
    raise CorruptImageError(f'Cannot decode image {path}{fix}') from e


def to_rgb(image: Image.Image) -> Image.Image:
  """`image` in RGB, samples wider than 8 bits scaled (not clipped) to 0..255.

  `convert('RGB')` clips: a 16-bit PNG comes out white. Here 16-bit samples
  (modes I;16*, and I, as PIL decodes 16-bit PNG and TIFF files) are divided
  by 257 (65535 -> 255, values outside 0..65535 clipped); float samples (F)
  in [0, 1] are multiplied by 255, other float images are taken as 0..255.
  Every other mode (palette, CMYK, LA, RGBA, 1, ...) goes through PIL's
  conversion, alpha dropped as there: 8-bit images stay bit-identical to the
  reference's loader.
  """
  if image.mode == 'I' or image.mode.startswith('I;16'):
    samples = np.clip(np.asarray(image, np.float64), 0, 65535) / 257
  elif image.mode == 'F':
    samples = np.nan_to_num(np.asarray(image, np.float64))
    if samples.size and samples.min() >= 0 and samples.max() <= 1:
      samples = samples * 255
    samples = np.clip(samples, 0, 255)
  else:
    return image.convert('RGB')
  return Image.fromarray(np.round(samples).astype(np.uint8)).convert('RGB')


def check_images(split: FolderSplit, name: str, num_threads: int | None = None
                 ) -> None:
  """Decodes every image of `split` once (threaded, with a progress bar).

  So a file that does not decode stops a run before its first training step,
  not at the first evaluation. Raises CorruptImageError naming the first bad
  file in listing order, and how many more there are.
  """
  def problem(index):
    try:
      load_image(split.paths[index], split.origins[index])
    except CorruptImageError as e:
      return e
    return None

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    problems = [e for e in tqdm.tqdm(
        pool.map(problem, range(len(split))), total=len(split),
        desc=f'Checking the images of {name}', unit='images',
        disable=len(split) < LARGE_SPLIT) if e is not None]
  if problems:
    others = (f' ({len(problems) - 1} more images of {name} do not decode '
              'either)' if len(problems) > 1 else '')
    raise CorruptImageError(f'{problems[0]}{others}') from problems[0]


def _read(path: str, task: tasks.Task) -> Iterator[_Entry]:
  if os.path.isdir(path):
    return _read_image_folder(path)
  if path.endswith('.txt'):
    return _read_list(path)
  data = _load_json(path)
  if isinstance(data, list):
    return _read_synqt_json(path, data)
  if isinstance(data, dict):
    return _read_fgvc_json(path, data, task)
  raise SplitFileError(
      f'{path}: expected a JSON list of {{"<image path>": <label>}} objects '
      f'(SynQT) or one {{"<image path>": <class id>}} object (VPT FGVC), got '
      f'{type(data).__name__}.')


def _read_list(path: str) -> Iterator[_Entry]:
  directory = os.path.dirname(path)
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      fields = line.strip().rsplit(maxsplit=1)
      if not fields:
        continue
      origin = f'{path}:{line_number}'
      label = fields[1] if len(fields) == 2 else None
      yield _Entry(os.path.join(directory, fields[0]),
                   _parse_label(label, origin, line.strip()), origin)


def _read_image_folder(directory: str) -> Iterator[_Entry]:
  classes = image_folder_classes(directory)
  parent = os.path.dirname(directory)
  every_class = {os.path.realpath(os.path.join(parent, split, name))
                 for split in os.listdir(parent)
                 for name in _class_directories(os.path.join(parent, split))}
  for name in _class_directories(directory):
    class_directory = os.path.join(directory, name)
    others = every_class - {os.path.realpath(class_directory)}
    for path in _image_files(class_directory, others):
      yield _Entry(path, classes.index(name),
                   f'{class_directory} (class {name!r})')


def _image_files(class_directory: str, others: set[str]) -> list[str]:
  """The image files under `class_directory`, sorted by directory, then name.

  Symlinked directories are followed, but not back into a directory walked
  already (a loop), nor into or above another class directory (`others`,
  real paths: their images are not this class's); each one not followed is
  a warning.
  """
  visited, found = set(), []
  for walk_root, directories, files in os.walk(class_directory,
                                               followlinks=True):
    real = os.path.realpath(walk_root)
    crossed = walk_root != class_directory and [
        other for other in sorted(others)
        if _inside(real, other) or _inside(other, real)]
    if real in visited or crossed:
      directories.clear()
      logging.warning(
          'Not following %s (a symlink to %s): %s. Link image files, or '
          'directories of this class only, instead.', walk_root, real,
          'a loop back to a directory read already' if real in visited else
          f'it holds or lies in the class directory {crossed[0]}')
      continue
    visited.add(real)
    directories.sort()
    found += [(walk_root, file) for file in files
              if file.lower().endswith(IMAGE_EXTENSIONS)]
  return [os.path.join(walk_root, file) for walk_root, file in sorted(found)]


def _inside(path: str, directory: str) -> bool:
  """Whether real path `path` is `directory` or lies under it."""
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _read_synqt_json(path: str, data: list) -> Iterator[_Entry]:
  images = os.path.join(os.path.dirname(path), 'images')
  for number, item in enumerate(data, 1):
    origin = f'{path} entry {number}'
    if not (isinstance(item, dict) and len(item) == 1):
      raise SplitFileError(
          f'{origin}: expected a one-key object {{"<image path>": <label>}}, '
          f'got {item!r}.')
    (image, label), = item.items()
    yield _Entry(os.path.join(images, image),
                 _parse_label(label, origin, item), origin)


def _read_fgvc_json(path: str, data: dict,
                    task: tasks.Task) -> Iterator[_Entry]:
  directory = os.path.dirname(path)
  class_ids = set(data.values())
  for name in FGVC_SPLIT_FILES:
    if os.path.isfile(os.path.join(directory, name)):
      other_split = _load_json(os.path.join(directory, name))
      if isinstance(other_split, dict):
        class_ids.update(other_split.values())
  label_of_id = {class_id: label
                 for label, class_id in enumerate(sorted(class_ids))}
  images = os.path.join(directory, task.image_dir)
  for image, class_id in data.items():
    origin = f'{path} entry {image!r} (class id {class_id!r})'
    yield _Entry(os.path.join(images, image), label_of_id[class_id], origin)


def _load_json(path: str):
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise SplitFileError(f'{path}: not valid JSON ({e}).') from e


def _parse_label(label, origin: str, written) -> int:
  if isinstance(label, int) and not isinstance(label, bool):
    return label
  if isinstance(label, str) and label.lstrip('-').isdigit():
    return int(label)
  raise SplitFileError(
      f'{origin}: expected "<image path> <integer label>", got {written!r}.')
