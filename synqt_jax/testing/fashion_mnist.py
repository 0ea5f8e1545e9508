"""Fashion-MNIST from Debian's `dataset-fashion-mnist`, as an ImageFolder on disk.

`apt-get install dataset-fashion-mnist` puts the original IDX files in
/usr/share/datasets/fashion-mnist/. The real-data test and benchmarks/
real_transfer.py draw class-balanced subsets from them with a fixed seed and
write them as `<root>/<split>/<class name>/<i>.png`, which configs/folder.py reads.
"""
import gzip
import os

import numpy as np
from PIL import Image

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
# Label i's name (Zalando's), so folders sort into the original label order.
CLASS_NAMES = ('0_tshirt_top', '1_trouser', '2_pullover', '3_dress', '4_coat',
               '5_sandal', '6_shirt', '7_sneaker', '8_bag', '9_ankle_boot')
NUM_CLASSES = len(CLASS_NAMES)
IDX_HEADER_BYTES = {'images': 16, 'labels': 8}


def available(directory=DEBIAN_DIR) -> bool:
  return os.path.isfile(os.path.join(directory, 'train-labels-idx1-ubyte.gz'))


def require(directory=DEBIAN_DIR) -> None:
  """Raises a one-line error naming the package where the files are absent."""
  if not available(directory):
    raise FileNotFoundError(
        f'Fashion-MNIST is not in {directory}: apt-get install '
        'dataset-fashion-mnist (Debian/Ubuntu).')


def load(split, directory=DEBIAN_DIR):
  """(uint8 images [N, 28, 28], int labels [N]) of 'train' (60k) or 't10k' (10k)."""
  require(directory)
  arrays = {}
  for kind, suffix in (('images', 'idx3'), ('labels', 'idx1')):
    with gzip.open(os.path.join(directory, f'{split}-{kind}-{suffix}-ubyte.gz')) as f:
      arrays[kind] = np.frombuffer(f.read(), np.uint8, offset=IDX_HEADER_BYTES[kind])
  return arrays['images'].reshape(-1, 28, 28), arrays['labels'].astype(np.int64)


def balanced_indices(labels, per_class, seed, exclude=()):
  """`per_class` indices of each class, drawn without replacement with `seed`."""
  rng = np.random.default_rng(seed)
  pool = np.setdiff1d(np.arange(len(labels)), np.asarray(exclude, np.int64))
  return np.sort(np.concatenate([
      rng.choice(pool[labels[pool] == c], per_class, replace=False)
      for c in range(NUM_CLASSES)]))


def write_image_folder(root, splits):
  """Writes {split: (images, labels)} as `<root>/<split>/<class name>/<i>.png`."""
  for split, (images, labels) in splits.items():
    for name in CLASS_NAMES:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(
          os.path.join(root, split, CLASS_NAMES[label], f'{i:05d}.png'))
  return root


def vtab_style_folder(root, train=800, val=200, test=None, seed=0):
  """The VTAB-1k protocol on Fashion-MNIST: class-balanced splits `train<N>`
  and `val<M>` drawn apart from the training set with `seed`, and `test`, the
  first `test` test images (None: all 10k). Returns `root`."""
  images, labels = load('train')
  train_idx = balanced_indices(labels, train // NUM_CLASSES, seed)
  splits = {f'train{train}': (images[train_idx], labels[train_idx])}
  if val:
    val_idx = balanced_indices(labels, val // NUM_CLASSES, seed + 1, exclude=train_idx)
    splits[f'val{val}'] = (images[val_idx], labels[val_idx])
  test_images, test_labels = load('t10k')
  splits['test'] = (test_images[:test], test_labels[:test])
  return write_image_folder(root, splits)
