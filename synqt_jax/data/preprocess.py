"""Images as the model sees them: resized once to uint8, normalised per batch.

Images are resized once, with PIL bicubic straight to S x S (bit-identical to
the reference's torchvision Resize((S, S)) on PIL images), kept as uint8, and
normalised per batch in float32, as `data.normalization` says.
"""
import numpy as np
from PIL import Image

from synqt_jax import errors
from synqt_jax.data import folders
from synqt_jax.weights import checkpoint

NORMALIZATIONS = ('imagenet', 'inception')
# data.normalization that the backbone's file decides (resolve_normalization).
AUTO_NORMALIZATION = 'auto'
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)


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
  `augment.CropFlipSource` range over it (VPT's range over the whole longer
  side) and its centre crops are VPT's CenterCrop (to a pixel where the
  longer side's margin is odd).
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
  check_normalization(normalization)
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
    raise errors.DataConfigError(
        f"data.normalization='auto', but {c.source!r} records no input "
        "normalisation; set data.normalization='inception' ([-1, 1], Google's "
        "ViT) or 'imagenet' (ImageNet mean/std: DINOv2, timm, the SynQT "
        'reference), or convert the file with python -m synqt_jax.convert.')
  config = config.copy_and_resolve_references()
  config.data.normalization = recorded
  return config


def check_normalization(normalization: str) -> None:
  """Raises DataConfigError unless `normalization` is one of NORMALIZATIONS."""
  if normalization == AUTO_NORMALIZATION:
    raise errors.DataConfigError(
        "data.normalization='auto' must be resolved from the checkpoint first "
        '(resolve_normalization).')
  if normalization not in NORMALIZATIONS:
    raise errors.DataConfigError(f'data.normalization={normalization!r}; '
                                 f'expected one of {NORMALIZATIONS}.')


def _rgb(image: np.ndarray) -> np.ndarray:
  if image.dtype != np.uint8:
    raise ValueError(f'Expected uint8 image, got {image.dtype}.')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f'Expected an image [H, W], [H, W, 1] or [H, W, 3], got {image.shape}.')
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
