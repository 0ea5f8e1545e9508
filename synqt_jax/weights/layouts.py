"""How a ViT's parameters are laid out: the published files' flat keys, the
other layouts renamed to them, and the model's nested tree of stacked layers.

A checkpoint is a flat `{'Transformer/encoderblock_0/LayerNorm_0/scale': array}`
file; `models_vit.VisionTransformer` is built with the same names, so loading is
`nest(flat)` after the file has been checked key by key and shape by shape.

Besides the published files, `official_layout` reads the other layouts Google's
ViTs are stored in: Linen names (`MultiHeadDotProductAttention_0`, as vit_jax
writes after `convert_pre_linen` and big_vision names), an `opt/target/` (old
vit_jax training state) or `params/` (big_vision) prefix, big_vision's
position embedding and its `scan`ned blocks, and the hybrids' (1, 1, 1, C)
GroupNorm parameters.
"""
import collections
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from synqt_jax import errors
from synqt_jax.training import host_memory

POSEMB = 'Transformer/posembed_input/pos_embedding'
# The parameters inside a saved training state: old vit_jax's optimizer target,
# big_vision's `params` collection.
PARAMETER_PREFIXES = ('opt/target/', 'params/')
# A block's submodules as Linen numbers them (per class: vit_jax after
# `convert_pre_linen`, big_vision) -> as the published files do (across the block).
LINEN_BLOCK_NAMES = {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
                     'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}
# Where big_vision keeps the position embedding (patches only, the class token
# is concatenated after it is added); old big_vision put it in the encoder.
BIG_VISION_POSEMBS = ('pos_embedding', 'Transformer/pos_embedding')
# What the parameter trees hold stacked on a leading layer axis, for the scans
# over the layers (`Transformer/encoderblock/...`, as big_vision's `scan`), and
# files as one key per layer (`Transformer/encoderblock_3/...`): the ViT's
# blocks, and SynQT's per-layer modules. At any depth of a tree (`backbone/...`
# in a full fine-tuning's trainable parameters).
SCANNED_LAYERS = ('Transformer/encoderblock', 'synqt/prompt_ffn', 'synqt/qsm_block')
LAYER_PATTERN = re.compile(
    rf'(|.*/)({"|".join(SCANNED_LAYERS)})_(\d+)/(.*)')
GROUP_NORM_PARAM = re.compile(r'(^|/)gn(_root|_proj|\d+)/(scale|bias)$')
LAYOUTS = ('official vit_jax .npz, Linen-named, opt/target/ or big_vision params/ '
           '(ViT with a class token or gap, R50+ViT hybrid)')


def official_layout(flat, path='checkpoint'):
  """`flat` (any layout in `LAYOUTS`) renamed and reshaped to the published files'."""
  for prefix in PARAMETER_PREFIXES:
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if any(k.startswith('MAPHead_0/') for k in flat):
    raise errors.CheckpointError(
        f'{path!r} is a big_vision ViT with a MAP head (pool_type="map"); SynQT '
        f'reads ViTs with a class token or "gap" pooling. Use one of those.')
  flat = unscanned(flat)
  if any(re.match(r'Transformer/encoderblock_\d+/MultiHeadDotProductAttention_0/', k)
         for k in flat):
    flat = {_official_block_name(k): v for k, v in flat.items()}
  for key in BIG_VISION_POSEMBS:
    if key in flat:
      posemb = flat.pop(key)
      if 'cls' in flat:  # big_vision's class token has no position embedding.
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
      flat[POSEMB] = posemb
  return {k: (v.reshape(-1) if GROUP_NORM_PARAM.search(k) else v)
          for k, v in flat.items()}


def unscanned(flat):
  """Layers stacked on axis 0 (`.../Transformer/encoderblock/...`, big_vision's
  `scan` layout and this package's parameter trees) as one key per layer."""
  out = {}
  for k, v in flat.items():
    m = re.fullmatch(rf'(|.*/)({"|".join(SCANNED_LAYERS)})/(.*)', k)
    if m is None:
      out[k] = v
      continue
    prefix, name, rest = m.groups()
    for i in range(v.shape[0]):
      out[f'{prefix}{name}_{i}/{rest}'] = (
          jax.ShapeDtypeStruct(v.shape[1:], v.dtype) if _is_shape(v) else v[i])
  return out


def scanned(flat, consume=False):
  """The inverse of `unscanned`: one key per layer -> layers stacked on axis 0.

  Stacked once, at load: the model scans over the stacked layers (one layer
  to compile), and a stacking inside a step would copy them at every step.
  `consume`: empty `flat` and let go of each layer's arrays once stacked, so
  that a file's backbone is held about once, not twice, while it is stacked.
  """
  layers, out = collections.defaultdict(dict), {}
  for k, v in flat.items():
    if m := LAYER_PATTERN.fullmatch(k):
      prefix, name, i, rest = m.groups()
      layers[prefix + name + '/' + rest][int(i)] = v
    else:
      out[k] = v
  if consume:
    flat.clear()
  for k in list(layers):
    by_index = layers.pop(k)
    stack = [by_index.pop(i) for i in sorted(by_index)]
    if _is_shape(stack[0]):
      out[k] = jax.ShapeDtypeStruct((len(stack),) + stack[0].shape, stack[0].dtype)
    else:  # On the host for host arrays (a file), else where they are.
      out[k] = (_host_stack(stack) if all(isinstance(x, np.ndarray) for x in stack)
                else jnp.stack(stack))
  return out


def _host_stack(arrays):
  """`np.stack` into an array a CPU device takes in place (host_memory.aligned)."""
  out = host_memory.aligned_empty((len(arrays),) + arrays[0].shape,
                                  np.result_type(*arrays))
  return np.stack(arrays, out=out)


def _is_shape(x):
  """Whether `x` is a shape only (benchmarks and checks lay out shapes, too)."""
  return isinstance(x, jax.ShapeDtypeStruct)


def _official_block_name(key):
  parts = key.split('/')
  if len(parts) > 2 and parts[0] == 'Transformer':
    parts[2] = LINEN_BLOCK_NAMES.get(parts[2], parts[2])
  return '/'.join(parts)


def nest(flat, consume=False):
  """`{'a/b/c': x}` (the file's names) -> `{'a': {'b': {'c': x}}}`, the Flax tree.

  The tree holds the blocks stacked (`scanned`, which `consume` is passed to),
  as `VisionTransformer` scans them.
  """
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in scanned(flat, consume).items()})


def host_tree(flat, dtype=np.float32):
  """`nest(flat)` of host arrays, consuming `flat`, every leaf in `dtype` and 64-byte
  aligned: what a CPU device takes in place, so the backbone is held once."""
  for k, v in flat.items():
    flat[k] = np.asarray(v, dtype)
  return jax.tree.map(host_memory.aligned, nest(flat, consume=True))


def flatten(tree):
  """The inverse of `nest`: a Flax tree -> `{'a/b/c': x}` under the file's names."""
  return unscanned({'/'.join(k): v
                    for k, v in flax.traverse_util.flatten_dict(tree).items()})
