"""VPT's FGVC augmentation: random crops and flips of images stored larger.

With data.augmentation='vpt' a split's images are stored with the shorter
side at 256/224 S (`preprocess.resize_shorter_side`); training draws a random
S crop and a horizontal flip of each, evaluation takes the centre S crop.
"""
import numpy as np

from synqt_jax.config import fields as config_fields
from synqt_jax.data import sources

AUGMENTATIONS = ('none', 'vpt')
# VPT's FGVC recipe at 224: Resize(256), then a 224 crop (its transforms.py).
VPT_RESIZE_RATIO = 256 / 224


def augmentation(data_config) -> str:
  """data.augmentation; a config without the field (an older one's) has none."""
  return data_config.get('augmentation',
                         config_fields.DATA_DEFAULTS['augmentation'])


class CropFlipSource(sources.Source):
  """VPT's FGVC views of a source of R x R images, at S x S (S < R).

  Indexing gives the centre crop (evaluation, and any fixed view);
  `augmented(index, rng)` a random crop, flipped left-right with probability
  1/2 (training: `batches.train_batches` draws `rng` from (seed, step,
  example)).
  """

  def __init__(self, source: sources.Source, image_size: int):
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


def training_view(source: sources.Source, seed: int, step: int):
  """index -> (image, label) of training step `step`: augmented if `source` is.

  An augmented example's view is drawn from default_rng([seed, step, index]):
  a function of the step and the example alone, so resuming at any step
  yields the same views, on any number of hosts.
  """
  if not isinstance(source, CropFlipSource):
    return source.__getitem__
  return lambda index: source.augmented(
      index, np.random.default_rng([seed, step, int(index)]))
