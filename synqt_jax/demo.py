"""Offline demo assets: a tiny random ViT checkpoint and a learnable image task.

configs/tiny.py points `backbone.source` and `data.root` into the workdir (for a
remote one, gs://..., into its local directory: workdir.local_directory), sets
`config.demo`, and names `prepare` as the run's `config.prepare` hook, which
the trainer calls first; `prepare(config)` writes whatever of the two is
missing, so the whole training path (checkpoint loading, prepared-folder
reading, training, evaluation) runs without a download.

The images carry a class signal a small model learns in a few epochs: each
class has its own colour and its own stripe orientation, under per-image
brightness jitter and pixel noise.
"""
import colorsys
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from synqt_jax.data import tasks
from synqt_jax.testing import random_vit


def prepare(config) -> None:
  """Writes the demo checkpoint and data set if they are absent."""
  demo = config.demo
  if not os.path.exists(config.backbone.source):
    _write_atomically(config.backbone.source, lambda path: random_vit.write(
        path, width=demo.width, depth=demo.depth, heads=demo.heads,
        mlp=demo.mlp, patch=demo.patch, image=config.data.image_size,
        classes=10, pre_logits=False, seed=demo.seed, scale=demo.scale))
  if not os.path.exists(config.data.root):
    task = tasks.get_task(config.data.task)
    # A VTAB task gets the whole NOAH set (sweep.py's held-out protocol reads
    # train800 and val200); any other the configured training split.
    train_split = 'train800val200' if task.is_vtab else config.data.train_split
    splits = {train_split: demo.train_examples,
              config.data.test_split: demo.test_examples}

    def write(root):
      directory = os.path.join(root, task.folder_names[0])
      write_folder(directory, splits, task.num_classes,
                   config.data.image_size, demo.seed)
      if task.is_vtab:
        write_held_out_lists(directory)

    _write_atomically(config.data.root, write)


def _write_atomically(path, write):
  """Writes beside `path`, then renames: a killed run leaves nothing half-done.

  Processes sharing a workdir may race here; the first rename wins and the
  others' identical copies are dropped.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.demo-')
  try:
    staged = os.path.join(tmp, os.path.basename(path))
    write(staged)
    try:
      os.rename(staged, path)
    except OSError:
      if not os.path.exists(path):
        raise
  finally:
    shutil.rmtree(tmp)


def class_images(labels, num_classes, size, rng):
  """uint8 [N, size, size, 3]: class colour and stripe angle, plus noise."""
  y, x = np.mgrid[:size, :size] / size
  images = []
  for label in labels:
    colour = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.9))
    angle = np.pi * label / num_classes
    stripes = np.sin(2 * np.pi * 3 * (x * np.cos(angle) + y * np.sin(angle)))
    image = colour * (0.6 + 0.3 * stripes[..., None]) * rng.uniform(0.7, 1.1)
    image = image + rng.normal(0, 0.08, image.shape)
    images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
  return np.stack(images)


def write_folder(directory, splits, num_classes, size, seed):
  """A NOAH-layout task folder: `<split>.txt` lists and `images/<split>/*.png`."""
  for index, (split, count) in enumerate(splits.items()):
    rng = np.random.default_rng([seed, index])
    labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    os.makedirs(os.path.join(directory, 'images', split))
    lines = []
    for i, (image, label) in enumerate(
        zip(class_images(labels, num_classes, size, rng), labels)):
      name = f'images/{split}/{i:06d}.png'
      Image.fromarray(image).save(os.path.join(directory, name))
      lines.append(f'{name} {label}\n')
    with open(os.path.join(directory, f'{split}.txt'), 'w') as f:
      f.writelines(lines)


def write_held_out_lists(directory, train_fraction=0.8):
  """train800.txt and val200.txt: train800val200.txt's first 80% and the rest.

  As in NOAH's VTAB-1k folders, train800val200 is their union (same images).
  """
  with open(os.path.join(directory, 'train800val200.txt')) as f:
    lines = f.readlines()
  cut = int(len(lines) * train_fraction)
  for split, part in (('train800', lines[:cut]), ('val200', lines[cut:])):
    with open(os.path.join(directory, f'{split}.txt'), 'w') as f:
      f.writelines(part)
