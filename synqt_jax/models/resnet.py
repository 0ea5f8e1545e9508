"""The ResNet stem of Google's R50+ViT hybrids, named as their checkpoints are.

A hybrid's patch embedding reads a ResNet feature map, not pixels: a 7x7/2 root
convolution (`conv_root`, `gn_root`), a 3x3/2 max pool, then stages of bottleneck
units (`block1/unit1/conv1`, ...), every convolution weight-standardised and
followed by GroupNorm (BiT). The modules live directly in `VisionTransformer`'s
tree, as in the files; the stem is part of the frozen backbone.
"""
import dataclasses
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT_STRIDE = 4  # The root convolution's stride 2 times the max pool's.
WEIGHT_STANDARDIZATION_EPS = 1e-5  # BiT's; GroupNorm keeps Flax's 1e-6, 32 groups.
BOTTLENECK_EXPANSION = 4  # A unit's output has 4x its bottleneck width.


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """The stem: units per stage ((3, 4, 9) for R50's first three) and root width."""
  num_layers: Tuple[int, ...]
  width: int = 64

  @property
  def stride(self):
    """Input pixels per feature-map cell: the root's 4, x2 per stage after the first."""
    return ROOT_STRIDE * 2 ** max(len(self.num_layers) - 1, 0)

  @property
  def out_channels(self):
    if not self.num_layers:
      return self.width
    return self.width * 2 ** (len(self.num_layers) - 1) * BOTTLENECK_EXPANSION


def standardize(kernel):
  """Zero mean, unit (population) std over each output channel's HWI weights."""
  kernel = kernel - kernel.mean(axis=(0, 1, 2))
  return kernel / (kernel.std(axis=(0, 1, 2)) + WEIGHT_STANDARDIZATION_EPS)


class StdConv(nn.Module):
  """A bias-free 'SAME' convolution whose kernel is standardised at every call."""
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), standardize(kernel).astype(self.dtype),
        (self.strides, self.strides), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def group_norm(dtype, name=None, **kwargs):
  return nn.GroupNorm(dtype=dtype, name=name, **kwargs)


class BottleneckUnit(nn.Module):
  """`unitK`: relu(shortcut + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1 x)))))))).

  The shortcut is `gn_proj(conv_proj x)` where the shape changes, else `x`.
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = self.features * BOTTLENECK_EXPANSION
    shortcut = x
    if x.shape[-1] != out or self.strides != 1:
      shortcut = StdConv(out, 1, self.strides, self.dtype, name='conv_proj')(x)
      shortcut = group_norm(self.dtype, 'gn_proj')(shortcut)
    y = nn.relu(group_norm(self.dtype, 'gn1')(
        StdConv(self.features, 1, 1, self.dtype, name='conv1')(x)))
    y = nn.relu(group_norm(self.dtype, 'gn2')(
        StdConv(self.features, 3, self.strides, self.dtype, name='conv2')(y)))
    y = group_norm(self.dtype, 'gn3', scale_init=nn.initializers.zeros)(
        StdConv(out, 1, 1, self.dtype, name='conv3')(y))
    return nn.relu(shortcut + y)


class ResNetStage(nn.Module):
  """`blockS`: `units` bottleneck units; the first may downsample."""
  units: int
  features: int
  first_stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.units):
      x = BottleneckUnit(self.features, self.first_stride if i == 0 else 1,
                         self.dtype, name=f'unit{i + 1}')(x)
    return x


def stage_name(i):
  """The checkpoint's name of stage i (from 0): 'block1', 'block2', ..."""
  return f'block{i + 1}'


def root(conv, norm, x):
  """The root: conv_root, gn_root, relu, 3x3/2 max pool ('SAME')."""
  x = nn.relu(norm(conv(x)))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')


def stages(config: ResNetConfig, dtype):
  """The stages of `config`, stage i of width `width * 2**i`, strided from the second."""
  return [ResNetStage(units, config.width * 2 ** i, 1 if i == 0 else 2, dtype)
          for i, units in enumerate(config.num_layers)]
