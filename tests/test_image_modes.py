"""Decoding images of every PIL mode, and checking a split before training (issue 15)."""
import os

import numpy as np
from PIL import Image
import pytest

from synqt_jax.data import data_config
from synqt_jax.data import folders
from synqt_jax.data import preprocess
from synqt_jax.data import tasks

GRADIENT16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)


def decoded(image, tmp_path, name, **save_args):
  path = os.path.join(tmp_path, name)
  image.save(path, **save_args)
  return np.asarray(folders.load_image(path))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
  """Defect 5: mode I;16 came out white (convert('RGB') saturates)."""
  image = Image.fromarray(GRADIENT16)
  assert image.mode == 'I;16'
  rgb = decoded(image, tmp_path, 'gray16.png')
  assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
  want = np.round(GRADIENT16 / 257).astype(np.uint8)
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], want)
  np.testing.assert_array_equal(  # And a 16-bit image handed to resize.
      preprocess.resize(image, 64), rgb)


def test_32_bit_integer_and_float_images_are_scaled(tmp_path):
  as_int = Image.fromarray(GRADIENT16.astype(np.int32))
  assert as_int.mode == 'I'
  np.testing.assert_array_equal(
      decoded(as_int, tmp_path, 'int.tif')[..., 0],
      np.round(GRADIENT16 / 257).astype(np.uint8))
  unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
  np.testing.assert_array_equal(
      decoded(Image.fromarray(unit), tmp_path, 'float.tif')[..., 1],
      np.round(unit.astype(np.float64) * 255).astype(np.uint8))


def test_palette_cmyk_la_and_rgba_images(tmp_path):
  palette = Image.new('P', (4, 4))
  palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
  palette.putpixel((1, 1), 1)
  rgb = decoded(palette, tmp_path, 'palette.png')
  assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[1, 1]) == (200, 100, 0)
  transparent = palette.copy()
  transparent.info['transparency'] = 0
  assert tuple(decoded(transparent, tmp_path, 'transparent.png')[1, 1]) == (
      200, 100, 0)
  cmyk = Image.new('CMYK', (4, 4), (0, 255, 255, 0))
  assert tuple(decoded(cmyk, tmp_path, 'cmyk.jpg', quality=100)[0, 0]) == (
      pytest.approx(255, abs=2), pytest.approx(0, abs=2),
      pytest.approx(0, abs=2))
  la = Image.new('LA', (4, 4), (100, 7))
  assert tuple(decoded(la, tmp_path, 'la.png')[0, 0]) == (100, 100, 100)
  rgba = Image.new('RGBA', (4, 4), (1, 2, 3, 0))
  assert tuple(decoded(rgba, tmp_path, 'rgba.png')[0, 0]) == (1, 2, 3)


def test_8_bit_images_decode_as_convert_rgb_does(tmp_path):
  """The reference's loader (PIL convert('RGB')), bit for bit."""
  rng = np.random.default_rng(0)
  for mode, array in (('L', rng.integers(0, 256, (8, 8), np.uint8)),
                      ('RGB', rng.integers(0, 256, (8, 8, 3), np.uint8))):
    image = Image.fromarray(array, mode)
    np.testing.assert_array_equal(decoded(image, tmp_path, f'{mode}.png'),
                                  np.asarray(image.convert('RGB')))


def write_split(root, count, corrupt=()):
  directory = os.path.join(root, 'eurosat')
  os.makedirs(os.path.join(directory, 'images'), exist_ok=True)
  lines = []
  for i in range(count):
    name = f'images/{i}.png'
    path = os.path.join(directory, name)
    if i in corrupt:
      with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
    else:
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(path)
    lines.append(f'{name} {i % 10}\n')
  with open(os.path.join(directory, 'test.txt'), 'w') as f:
    f.writelines(lines)


def test_every_image_of_a_split_is_checked_before_training(tmp_path):
  """Defect 4: a corrupt test image crashed the run at the first evaluation."""
  write_split(tmp_path, 30, corrupt=(7, 20))
  config = data_config.default_data_config(source='folder', task='eurosat',
                                           root=str(tmp_path), image_size=8)
  source = data_config.load_source(config, 'test')  # Lists; decodes none.
  with pytest.raises(folders.CorruptImageError) as info:
    source.check_images()
  message = str(info.value)
  assert message.startswith(
      f'Cannot decode image {tmp_path}/eurosat/images/7.png (listed at '
      f'{tmp_path}/eurosat/test.txt:8)')
  assert '(1 more images of eurosat:test do not decode either)' in message


def test_a_clean_split_passes_the_check(tmp_path):
  write_split(tmp_path, 12)
  split = folders.read_split(str(tmp_path), tasks.get_task('eurosat'), 'test')
  folders.check_images(split, 'eurosat:test', num_threads=2)
