"""Google's official ViT `.npz` checkpoints: find, download, check, load.

A checkpoint is a flat `{'Transformer/encoderblock_0/LayerNorm_0/scale': array}`
file; `models_vit.VisionTransformer` is built with the same names, so loading is
`nest(flat)` after the file has been checked key by key and shape by shape. The
architecture (width, depth, heads, MLP size, patch, tokens, pre_logits, classes,
class token or 'gap', ResNet stem) is read from the file itself.

Besides the published files, `official_layout` reads the other layouts Google's
ViTs are stored in: Linen names (`MultiHeadDotProductAttention_0`, as vit_jax
writes after `convert_pre_linen` and big_vision names), an `opt/target/` (old
vit_jax training state) or `params/` (big_vision) prefix, big_vision's
position embedding and its `scan`ned blocks, and the hybrids' (1, 1, 1, C)
GroupNorm parameters.
"""
import collections
import dataclasses
import hashlib
import math
import os
import re
import tempfile
import urllib.parse
import urllib.request
import zipfile
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import tqdm

from synqt_jax import errors
from synqt_jax.training import host_memory
from synqt_jax.models import resnet as models_resnet
from synqt_jax.models import vit as models_vit

GCS_ROOT = 'https://storage.googleapis.com/vit_models'
# Collections of published checkpoints, as laid out in gs://vit_models/.
COLLECTIONS = ('imagenet21k', 'imagenet21k+imagenet2012', 'augreg')


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


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint that cannot be used; the message says why and what to do."""


def summarize(keys, limit=6):
  """A few keys by name; many as their count per top-level name, on one line."""
  keys = sorted(keys)
  if len(keys) <= limit:
    return ', '.join(keys)
  depth = 2 if len({k.split('/')[0] for k in keys}) == 1 else 1
  groups = collections.Counter('/'.join(k.split('/')[:depth]) + '/*' for k in keys)
  parts = [f'{g} ({n})' for g, n in sorted(groups.items())]
  if len(parts) > limit:
    parts = parts[:limit] + [f'{len(parts) - limit} more groups']
  return f'{len(keys)} keys: ' + ', '.join(parts)


def default_cache_dir():
  return os.environ.get('SYNQT_JAX_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'synqt_jax'))


def gcs_to_https(url):
  """`gs://bucket/path` -> the public HTTPS address of the same object."""
  bucket_path = url[len('gs://'):]
  return 'https://storage.googleapis.com/' + urllib.parse.quote(bucket_path)


def published_url(name, collection='imagenet21k'):
  """The URL of a published checkpoint, e.g. ('ViT-B_16', 'imagenet21k').

  AugReg names are the file stems of gs://vit_models/augreg/, e.g.
  'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'.
  """
  if collection not in COLLECTIONS:
    raise CheckpointError(
        f'Unknown checkpoint collection {collection!r}; use one of {COLLECTIONS}.')
  name = name[:-len('.npz')] if name.endswith('.npz') else name
  if collection != 'augreg' and not re.fullmatch(r'(R50\+)?ViT-[A-Za-z]+_\d+', name):
    raise CheckpointError(
        f'{name!r} is not a published ViT name; expected e.g. "ViT-B_16" '
        f'(sizes Ti/S/B/L/H, patches 32/16/14/8), or a local path or URL.')
  return f'{GCS_ROOT}/{urllib.parse.quote(collection)}/{urllib.parse.quote(name)}.npz'


def resolve(source, collection='imagenet21k', cache_dir=None):
  """A local path for `source`: a path, a gs:// or https:// URL, or a short name.

  URLs and names download once into `cache_dir` (default `~/.cache/synqt_jax`,
  or `$SYNQT_JAX_CACHE`) and are reused offline afterwards.
  """
  source = os.fspath(source)
  if source.startswith('gs://'):
    url = gcs_to_https(source)
  elif source.startswith(('http://', 'https://')):
    url = source
  elif os.path.exists(source) or os.sep in source or source.endswith('.npz'):
    if not os.path.exists(source):
      raise CheckpointError(
          f'Checkpoint file {source!r} does not exist. Give the path of a ViT .npz '
          f'file, a gs:// or https:// URL, or a published name such as "ViT-B_16".')
    return source
  else:
    url = published_url(source, collection)
  cache_dir = cache_dir or default_cache_dir()
  parts = urllib.parse.urlparse(url)
  local = os.path.join(cache_dir, parts.netloc,
                       urllib.parse.unquote(parts.path).lstrip('/'))
  if not os.path.exists(local):
    download(url, local)
  return local


def download(url, path):
  """Downloads `url` to `path` with a progress bar; keeps it only if it is whole.

  The file is written beside `path` and renamed into place after its size matches
  the server's Content-Length and it reads as a ViT checkpoint, so an interrupted
  download never leaves a half file in the cache.
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.part')
  try:
    try:
      response = urllib.request.urlopen(url, timeout=60)
    except OSError as e:
      os.close(fd)  # Not yet handed to os.fdopen below.
      raise CheckpointError(
          f'Could not download {url}: {e}. Check the network, or download the file '
          f'yourself and pass its local path.') from e
    with response, os.fdopen(fd, 'wb') as f:
      total = int(response.headers.get('Content-Length') or 0) or None
      with tqdm.tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(path)) as bar:
        while chunk := response.read(1 << 20):
          f.write(chunk)
          bar.update(len(chunk))
    size = os.path.getsize(tmp)
    if total is not None and size != total:
      raise CheckpointError(
          f'Download of {url} stopped at {size} of {total} bytes; run again to retry.')
    vit_config(official_layout(load_npz(tmp, name=url), url), url)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_npz(path, name=None):
  """The flat `{key: float32 array}` of an `.npz`, or a CheckpointError saying why not."""
  name = name or path
  if not os.path.exists(path):
    raise CheckpointError(f'Checkpoint file {name!r} does not exist.')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
    raise CheckpointError(
        f'Checkpoint file {name!r} is truncated or corrupt ({errors.unreadable_npz(e)}). '
        f'Delete it and download it again.') from e


def official_layout(flat, path='checkpoint'):
  """`flat` (any layout in `LAYOUTS`) renamed and reshaped to the published files'."""
  for prefix in PARAMETER_PREFIXES:
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if any(k.startswith('MAPHead_0/') for k in flat):
    raise CheckpointError(
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


def _shape(flat, key, path):
  if key not in flat:
    raise CheckpointError(
        f'{path!r} is not a ViT checkpoint: it has no {key!r} (found '
        f'{summarize(flat)}). Expected one of: {LAYOUTS}.')
  return flat[key].shape


def resnet_config(flat, path='checkpoint'):
  """The hybrid's `ResNetConfig` (units per `blockS`, root width), or None."""
  if 'conv_root/kernel' not in flat:
    return None
  units = collections.defaultdict(set)
  for k in flat:
    if m := re.match(r'block(\d+)/unit(\d+)/', k):
      units[int(m.group(1))].add(int(m.group(2)))
  if sorted(units) != list(range(1, len(units) + 1)) or any(
      sorted(u) != list(range(1, len(u) + 1)) for u in units.values()):
    raise CheckpointError(f'{path!r}: the ResNet stem\'s stages are not numbered '
                          f'block1.. / unit1..: found {summarize(units)}.')
  return models_resnet.ResNetConfig(
      num_layers=tuple(len(units[s]) for s in sorted(units)),
      width=_shape(flat, 'conv_root/kernel', path)[-1])


def vit_config(flat, path='checkpoint', image_size=None, **overrides):
  """The `ViTConfig` a flat checkpoint describes; `image_size` defaults to the file's.

  `flat` is in the published layout (see `official_layout`).
  """
  patch, _, _, width = _shape(flat, 'embedding/kernel', path)
  tokens = _shape(flat, POSEMB, path)[1]
  depth = len({m.group(1) for k in flat
               if (m := re.match(r'Transformer/encoderblock_(\d+)/', k))})
  if depth == 0:
    raise CheckpointError(f'{path!r} is not a ViT checkpoint: it has no encoder blocks.')
  block = 'Transformer/encoderblock_0/'
  heads = _shape(flat, block + 'MultiHeadDotProductAttention_1/query/kernel', path)[1]
  mlp = _shape(flat, block + 'MlpBlock_3/Dense_0/kernel', path)[1]
  classifier = 'token' if 'cls' in flat else 'gap'
  prefix = 1 if classifier == 'token' else 0
  grid = math.isqrt(tokens - prefix)
  if grid * grid != tokens - prefix:
    expected = ('1 + a square grid' if prefix else
                'a square grid (no class token: a "gap" ViT)')
    raise CheckpointError(
        f'{path!r}: position embedding has {tokens} tokens, not {expected}.')
  resnet = resnet_config(flat, path)
  stride = resnet.stride if resnet else 1
  return models_vit.ViTConfig(
      hidden_size=width, num_layers=depth, num_heads=heads, mlp_dim=mlp,
      patch_size=patch, image_size=image_size or grid * patch * stride,
      representation_size=(flat['pre_logits/kernel'].shape[1]
                           if 'pre_logits/kernel' in flat else None),
      num_classes=flat['head/kernel'].shape[1] if 'head/kernel' in flat else None,
      classifier=classifier, resnet=resnet, **overrides)


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


def tree_shapes(config):
  """The parameter tree of a `VisionTransformer(config)`, as ShapeDtypeStructs."""
  model = models_vit.VisionTransformer(config)
  return jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32))['params']


def expected_shapes(config):
  """`{key: shape}` of every parameter a `VisionTransformer(config)` owns, by
  the file's names."""
  return {k: v.shape for k, v in flatten(tree_shapes(config)).items()}


def check_against(flat, config, path='checkpoint'):
  """Raises a CheckpointError listing every missing key, unexpected key and bad shape."""
  want = expected_shapes(config)
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  wrong = [(k, want[k], flat[k].shape) for k in sorted(set(want) & set(flat))
           if tuple(flat[k].shape) != tuple(want[k])]
  problems = []
  if missing:
    problems.append(f'missing keys ({len(missing)}): {summarize(missing)}')
  if unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}): {summarize(unexpected)}')
  for k, w, f in wrong[:3]:
    problems.append(f'shape mismatch for {k}: expected {w}, found {f}')
  if len(wrong) > 3:
    problems.append(f'{len(wrong) - 3} more shape mismatches')
  if problems:
    raise CheckpointError(
        f'{path!r} does not match a ViT of {config.num_layers} blocks, width '
        f'{config.hidden_size}, {config.num_heads} heads: ' + '; '.join(problems)
        + f'. Use a checkpoint in one of these layouts: {LAYOUTS}.')


# How a position embedding is resized to another grid (`backbone.posemb_resize`).
POSEMB_RESIZE = ('bilinear', 'vit_jax', 'bicubic')
# Keys under this prefix are facts about the file, not parameters (see convert.py).
METADATA_PREFIX = '__metadata__/'
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
    raise CheckpointError(f'backbone.posemb_resize={method!r}; expected one of '
                          f'{POSEMB_RESIZE}.')
  if posemb.shape[1] == num_tokens:
    return posemb
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old, new = int(round(grid.shape[0] ** 0.5)), int(round((num_tokens - 1) ** 0.5))
  if new * new != num_tokens - 1:
    raise CheckpointError(f'Cannot resize the position embedding to {num_tokens} '
                          f'tokens: {num_tokens - 1} is not a square grid.')
  grid = _resize_grid(grid.reshape(old, old, -1), new, method)
  return np.concatenate([cls, grid.reshape(1, new * new, -1)], axis=1)


def split_metadata(flat):
  """(parameters, {name: str}) of a flat file: converted files record facts."""
  meta = {k[len(METADATA_PREFIX):]: str(v) for k, v in flat.items()
          if k.startswith(METADATA_PREFIX)}
  return {k: v for k, v in flat.items() if not k.startswith(METADATA_PREFIX)}, meta


def file_metadata(source, collection='imagenet21k', cache_dir=None):
  """What a checkpoint records about itself (`normalization`, `posemb_resize`...)."""
  path = resolve(source, collection, cache_dir)
  with np.load(path, allow_pickle=False) as f:
    return {k[len(METADATA_PREFIX):]: str(f[k]) for k in f.files
            if k.startswith(METADATA_PREFIX)}


def _resized_posemb(posemb, config, method):
  """`interpolate_posemb` for either classifier: a 'gap' grid gets a stand-in class row."""
  if config.num_prefix_tokens:
    return interpolate_posemb(posemb, config.num_tokens, method)
  padded = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return interpolate_posemb(padded, config.num_tokens + 1, method)[:, 1:]


def load(source, image_size=None, collection='imagenet21k', cache_dir=None,
         headless=False, posemb_resize=None, storage_dtype=np.float32,
         **config_overrides):
  """Loads a ViT checkpoint: returns `(ViTConfig, params)` with params in the file's tree.

  Args:
    source: a local `.npz` path, a `gs://`/`https://` URL, or a published name
      (`'ViT-B_16'`, `'R50+ViT-B_16'`) in `collection`; any layout in `LAYOUTS`,
      whose parameters come back under the published files' names.
    image_size: input resolution; if it differs from the checkpoint's, the
      position embedding is interpolated.
    headless: drop the pre-trained classifier (`pre_logits`, `head`), for
      backbones that only feed a new task head.
    posemb_resize: how to resize the position embedding (POSEMB_RESIZE); None:
      the method the file records (converted DINOv2: 'bicubic'), else 'bilinear'.
    storage_dtype: what the parameters are held in (rounded once the position
      embedding is resized); the model computes in its activation dtype.
    config_overrides: `ViTConfig` fields such as `dtype` or `approximate_gelu`.
  """
  path = resolve(source, collection, cache_dir)
  flat, meta = split_metadata(load_npz(path))
  flat = official_layout(flat, path)
  config = vit_config(flat, path, image_size=image_size, **config_overrides)
  if image_size is not None and config.image_size % config.patch_stride:
    raise CheckpointError(f'image_size {image_size} is not a multiple of the '
                          f'checkpoint\'s patch size {config.patch_stride}.')
  flat[POSEMB] = _resized_posemb(
      flat[POSEMB], config, posemb_resize or meta.get('posemb_resize', 'bilinear'))
  check_against(flat, config, path)
  if headless:
    config = dataclasses.replace(config, representation_size=None, num_classes=None)
    flat = {k: v for k, v in flat.items() if not k.startswith(('pre_logits/', 'head/'))}
  return config, host_tree(flat, storage_dtype)


def digest(flat: Mapping[str, np.ndarray]) -> str:
  """sha256 over sorted keys, each key's UTF-8 bytes then its float32 C-order bytes."""
  h = hashlib.sha256()
  for k in sorted(flat):
    h.update(k.encode('utf-8'))
    h.update(np.ascontiguousarray(flat[k], np.float32).tobytes())
  return h.hexdigest()


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
