"""Google's official ViT `.npz` checkpoints: find, download, check, load.

A source (a path, a URL or a published name) is found or downloaded once; its
file is read in any layout (layouts.py), its architecture (width, depth, heads,
MLP size, patch, tokens, pre_logits, classes, class token or 'gap', ResNet
stem) read from the file itself, its position embedding resized to the run's
resolution (position_embedding.py), and every key and shape checked against
the model before the parameters are handed out.
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

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from synqt_jax import errors
from synqt_jax.models import resnet as models_resnet
from synqt_jax.models import vit as models_vit
from synqt_jax.weights import layouts
from synqt_jax.weights import position_embedding

GCS_ROOT = 'https://storage.googleapis.com/vit_models'
# Collections of published checkpoints, as laid out in gs://vit_models/.
COLLECTIONS = ('imagenet21k', 'imagenet21k+imagenet2012', 'augreg')


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
    raise errors.CheckpointError(
        f'Unknown checkpoint collection {collection!r}; use one of {COLLECTIONS}.')
  name = name[:-len('.npz')] if name.endswith('.npz') else name
  if collection != 'augreg' and not re.fullmatch(r'(R50\+)?ViT-[A-Za-z]+_\d+', name):
    raise errors.CheckpointError(
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
      raise errors.CheckpointError(
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
      raise errors.CheckpointError(
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
      raise errors.CheckpointError(
          f'Download of {url} stopped at {size} of {total} bytes; run again to retry.')
    vit_config(layouts.official_layout(load_npz(tmp, name=url), url), url)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_npz(path, name=None):
  """The flat `{key: float32 array}` of an `.npz`, or a CheckpointError saying why not."""
  name = name or path
  if not os.path.exists(path):
    raise errors.CheckpointError(f'Checkpoint file {name!r} does not exist.')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
    raise errors.CheckpointError(
        f'Checkpoint file {name!r} is truncated or corrupt ({errors.unreadable_npz(e)}). '
        f'Delete it and download it again.') from e



def _shape(flat, key, path):
  if key not in flat:
    raise errors.CheckpointError(
        f'{path!r} is not a ViT checkpoint: it has no {key!r} (found '
        f'{summarize(flat)}). Expected one of: {layouts.LAYOUTS}.')
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
    raise errors.CheckpointError(
        f'{path!r}: the ResNet stem\'s stages are not numbered block1.. / '
        f'unit1..: found {summarize(units)}.')
  return models_resnet.ResNetConfig(
      num_layers=tuple(len(units[s]) for s in sorted(units)),
      width=_shape(flat, 'conv_root/kernel', path)[-1])


def vit_config(flat, path='checkpoint', image_size=None, **overrides):
  """The `ViTConfig` a flat checkpoint describes; `image_size` defaults to the file's.

  `flat` is in the published layout (see `official_layout`).
  """
  patch, _, _, width = _shape(flat, 'embedding/kernel', path)
  tokens = _shape(flat, layouts.POSEMB, path)[1]
  depth = len({m.group(1) for k in flat
               if (m := re.match(r'Transformer/encoderblock_(\d+)/', k))})
  if depth == 0:
    raise errors.CheckpointError(
        f'{path!r} is not a ViT checkpoint: it has no encoder blocks.')
  block = 'Transformer/encoderblock_0/'
  heads = _shape(flat, block + 'MultiHeadDotProductAttention_1/query/kernel', path)[1]
  mlp = _shape(flat, block + 'MlpBlock_3/Dense_0/kernel', path)[1]
  classifier = 'token' if 'cls' in flat else 'gap'
  prefix = 1 if classifier == 'token' else 0
  grid = math.isqrt(tokens - prefix)
  if grid * grid != tokens - prefix:
    expected = ('1 + a square grid' if prefix else
                'a square grid (no class token: a "gap" ViT)')
    raise errors.CheckpointError(
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


def tree_shapes(config):
  """The parameter tree of a `VisionTransformer(config)`, as ShapeDtypeStructs."""
  model = models_vit.VisionTransformer(config)
  return jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32))['params']


def expected_shapes(config):
  """`{key: shape}` of every parameter a `VisionTransformer(config)` owns, by
  the file's names."""
  return {k: v.shape for k, v in layouts.flatten(tree_shapes(config)).items()}


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
    raise errors.CheckpointError(
        f'{path!r} does not match a ViT of {config.num_layers} blocks, width '
        f'{config.hidden_size}, {config.num_heads} heads: ' + '; '.join(problems)
        + f'. Use a checkpoint in one of these layouts: {layouts.LAYOUTS}.')


# Keys under this prefix are facts about the file, not parameters (see convert.py).
METADATA_PREFIX = '__metadata__/'


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


def load(source, image_size=None, collection='imagenet21k', cache_dir=None,
         headless=False, posemb_resize=None, storage_dtype=np.float32,
         **config_overrides):
  """Loads a ViT checkpoint: returns `(ViTConfig, params)` with params in the file's tree.

  Args:
    source: a local `.npz` path, a `gs://`/`https://` URL, or a published name
      (`'ViT-B_16'`, `'R50+ViT-B_16'`) in `collection`; any layout in
      `layouts.LAYOUTS`, whose parameters come back under the published files'
      names.
    image_size: input resolution; if it differs from the checkpoint's, the
      position embedding is interpolated.
    headless: drop the pre-trained classifier (`pre_logits`, `head`), for
      backbones that only feed a new task head.
    posemb_resize: how to resize the position embedding (position_embedding.POSEMB_RESIZE);
      None: the method the file records (converted DINOv2: 'bicubic'), else
      'bilinear'.
    storage_dtype: what the parameters are held in (rounded once the position
      embedding is resized); the model computes in its activation dtype.
    config_overrides: `ViTConfig` fields such as `dtype` or `approximate_gelu`.
  """
  path = resolve(source, collection, cache_dir)
  flat, meta = split_metadata(load_npz(path))
  flat = layouts.official_layout(flat, path)
  config = vit_config(flat, path, image_size=image_size, **config_overrides)
  if image_size is not None and config.image_size % config.patch_stride:
    raise errors.CheckpointError(
        f'image_size {image_size} is not a multiple of the checkpoint\'s '
        f'patch size {config.patch_stride}.')
  flat[layouts.POSEMB] = position_embedding.resized_posemb(
      flat[layouts.POSEMB], config, posemb_resize or meta.get('posemb_resize', 'bilinear'))
  check_against(flat, config, path)
  if headless:
    config = dataclasses.replace(config, representation_size=None, num_classes=None)
    flat = {k: v for k, v in flat.items() if not k.startswith(('pre_logits/', 'head/'))}
  return config, layouts.host_tree(flat, storage_dtype)


def digest(flat: Mapping[str, np.ndarray]) -> str:
  """sha256 over sorted keys, each key's UTF-8 bytes then its float32 C-order bytes."""
  h = hashlib.sha256()
  for k in sorted(flat):
    h.update(k.encode('utf-8'))
    h.update(np.ascontiguousarray(flat[k], np.float32).tobytes())
  return h.hexdigest()


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
