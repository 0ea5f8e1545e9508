"""A position embedding resized to another grid of patches (`backbone.posemb_resize`).

Each method is the one a family of checkpoints is resized with, so a file
gives the model it was trained as: 'bilinear' (timm), 'vit_jax' (Google's
vit_jax) and 'bicubic' (DINOv2: PyTorch's bicubic, written out here as
PyTorch and ONNX Resize compute it).
"""
import jax
import numpy as np
import scipy.ndimage

from synqt_jax import errors

# How a position embedding is resized to another grid (`backbone.posemb_resize`).
POSEMB_RESIZE = ('bilinear', 'vit_jax', 'bicubic')
# PyTorch's and ONNX Resize's bicubic kernel (Keys' cubic convolution, a = -0.75).
BICUBIC_A = -0.75


def _cubic_weights(t):
  """The 4 cubic-convolution weights of taps -1, 0, 1, 2 at fraction `t` (n, 4)."""
  a = BICUBIC_A
  x = np.abs(t[:, None] - np.arange(-1, 3)[None, :])
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(old, new):
  """(new, old) matrix of a 1-D bicubic resize, as PyTorch and ONNX Resize compute it.

  `F.interpolate(mode='bicubic', size=new, align_corners=False, antialias=False)`
  = ONNX `Resize(mode='cubic', cubic_coeff_a=-0.75, half_pixel, sizes=new)`:
  output i samples input coordinate (i + 0.5) * old / new - 0.5, taps clamped
  to the border.
  """
  x = (np.arange(new) + 0.5) * (old / new) - 0.5
  left = np.floor(x)
  weights = _cubic_weights(x - left)
  taps = np.clip(left[:, None].astype(int) + np.arange(-1, 3)[None, :], 0, old - 1)
  matrix = np.zeros((new, old))
  np.add.at(matrix, (np.arange(new)[:, None].repeat(4, 1), taps), weights)
  return matrix


def _resize_grid(grid, new, method):
  """A (g, g, D) grid resized to (new, new, D) by `method` (see POSEMB_RESIZE)."""
  old = grid.shape[0]
  if method == 'bilinear':  # timm's resize_pos_embed, F.interpolate('bilinear').
    return np.asarray(jax.image.resize(grid, (new, new, grid.shape[-1]), 'linear',
                                       antialias=False))
  if method == 'vit_jax':  # Google's vit_jax checkpoint.py.
    return scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  m = bicubic_matrix(old, new)  # 'bicubic': DINOv2 (Hugging Face and the original).
  return np.einsum('ij,jkd,lk->ild', m, grid.astype(np.float64), m).astype(grid.dtype)


def interpolate_posemb(posemb, num_tokens, method='bilinear'):
  """Resizes a (1, 1 + g*g, D) position embedding to `num_tokens`, class token kept.

  `method` (POSEMB_RESIZE): 'bilinear' (half-pixel centres, no antialiasing, as
  timm's `resize_pos_embed` and PyTorch's `F.interpolate(mode='bilinear')`),
  'vit_jax' (`scipy.ndimage.zoom(order=1)`, as Google's vit_jax) or 'bicubic'
  (PyTorch's bicubic, as DINOv2 resizes at run time).
  """
  if method not in POSEMB_RESIZE:
    raise errors.CheckpointError(
        f'backbone.posemb_resize={method!r}; expected one of {POSEMB_RESIZE}.')
  if posemb.shape[1] == num_tokens:
    return posemb
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old, new = int(round(grid.shape[0] ** 0.5)), int(round((num_tokens - 1) ** 0.5))
  if new * new != num_tokens - 1:
    raise errors.CheckpointError(
        f'Cannot resize the position embedding to {num_tokens} tokens: '
        f'{num_tokens - 1} is not a square grid.')
  grid = _resize_grid(grid.reshape(old, old, -1), new, method)
  return np.concatenate([cls, grid.reshape(1, new * new, -1)], axis=1)


def resized_posemb(posemb, config, method):
  """`interpolate_posemb` for either classifier: a 'gap' grid gets a stand-in class row."""
  if config.num_prefix_tokens:
    return interpolate_posemb(posemb, config.num_tokens, method)
  padded = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return interpolate_posemb(padded, config.num_tokens + 1, method)[:, 1:]
