"""Figures: what SynQT's queries attend to, drawn over the image."""
import math

import jax
import matplotlib.pyplot as plt
import numpy as np


def attention_maps(attention):
  """(B, L, H, T, N) query attention -> (B, L, g, g) maps over the patch grid.

  Averaged over heads and query tokens; the class token's weight (if any: N is
  1 + g*g, or g*g for a 'gap' ViT) is dropped and each map renormalised over
  the patches.
  """
  maps = np.asarray(attention).mean(axis=(2, 3))
  grid = math.isqrt(maps.shape[-1])
  maps = maps[..., maps.shape[-1] - grid * grid:]
  maps = maps / maps.sum(-1, keepdims=True)
  return maps.reshape(maps.shape[:2] + (grid, grid))


def plot_attention(image, maps, layers=None, title=None):
  """One image and its per-layer query attention maps, upsampled and overlaid.

  Args:
    image: (S, S, 3) uint8 or float image as shown to a person.
    maps: (L, g, g) maps of that image (`attention_maps(...)[b]`).
    layers: which layers to draw (default: all).
  """
  layers = range(maps.shape[0]) if layers is None else layers
  image = np.asarray(image, np.float32)
  image = (image - image.min()) / max(image.max() - image.min(), 1e-8)
  fig, axes = plt.subplots(1, len(layers) + 1, figsize=(2 * (len(layers) + 1), 2.3))
  axes[0].imshow(image)
  axes[0].set_title(title or 'image', fontsize=8)
  size = image.shape[:2]
  for ax, layer in zip(axes[1:], layers):
    heat = np.asarray(jax.image.resize(maps[layer], size, 'bilinear'))
    ax.imshow(image)
    ax.imshow(heat, cmap='inferno', alpha=0.6)
    ax.set_title(f'layer {layer + 1}', fontsize=8)
  for ax in axes:
    ax.axis('off')
  fig.tight_layout()
  return fig
