"""Checkpoints: architecture from the file, counts, errors, interpolation, sources, families."""
import dataclasses
import functools
import http.server
import os
import shutil
import threading
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synqt_jax import errors
from synqt_jax.models import methods
from synqt_jax.models import resnet as models_resnet
from synqt_jax.models import synqt
from synqt_jax.models import vit as models_vit
from synqt_jax.testing import random_vit
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts
from synqt_jax.weights import position_embedding

POS = 'Transformer/posembed_input/pos_embedding'


def vit_param_count(width, depth, mlp, patch, image, representation=None, classes=None):
  """Parameters of a ViT, by formula (independent of the model code)."""
  d, tokens = width, 1 + (image // patch) ** 2
  n = patch * patch * 3 * d + d + d + tokens * d + 2 * d  # embedding, cls, pos, norm
  n += depth * (4 * d + 4 * (d * d + d) + d * mlp + mlp + mlp * d + d)
  out = d
  if representation:
    n, out = n + d * representation + representation, representation
  if classes:
    n += out * classes + classes
  return n


def zeros_checkpoint(config):
  """A flat checkpoint of `config`'s shapes without allocating it (broadcast zeros)."""
  return {k: np.broadcast_to(np.float32(0), s)
          for k, s in checkpoint.expected_shapes(config).items()}


# --- Architecture and sizes. ---

def test_vit_b16_with_a_1000_class_head_has_86_567_656_parameters():
  config = models_vit.ViTConfig(768, 12, 12, 3072, 16, 224, num_classes=1000)
  shapes = checkpoint.expected_shapes(config)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 86_567_656
  assert vit_param_count(768, 12, 3072, 16, 224, classes=1000) == 86_567_656


# name: (width, depth, heads, mlp, patch, image, pre_logits, classes, known count)
PUBLISHED = {
    'ViT-Ti_16': (192, 12, 3, 768, 16, 224, None, 1000, 5_717_416),
    'ViT-S_16': (384, 12, 6, 1536, 16, 224, None, 1000, 22_050_664),
    'ViT-B_32': (768, 12, 12, 3072, 32, 224, None, 1000, 88_224_232),
    'ViT-B_16-i21k': (768, 12, 12, 3072, 16, 224, 768, 21843, None),
    'ViT-B_8': (768, 12, 12, 3072, 8, 224, None, 1000, None),
    'ViT-L_16': (1024, 24, 16, 4096, 16, 224, None, 1000, 304_326_632),
    'ViT-L_32-i21k': (1024, 24, 16, 4096, 32, 224, 1024, 21843, None),
    'ViT-H_14-i21k': (1280, 32, 16, 5120, 14, 224, 1280, 21843, None),
    'ViT-B_16-384': (768, 12, 12, 3072, 16, 384, None, 1000, None),
    'ViT-L_16-384': (1024, 24, 16, 4096, 16, 384, None, 1000, None),
}


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_published_architectures_are_read_from_their_shapes(name):
  """Every published size (Ti/S/B/L/H, patches 32/16/14/8, 224 and 384 px) loads.

  Checked on shapes only: a dict of broadcast zeros in the file's layout.
  """
  width, depth, heads, mlp, patch, image, rep, classes, known = PUBLISHED[name]
  config = models_vit.ViTConfig(width, depth, heads, mlp, patch, image, rep, classes)
  flat = zeros_checkpoint(config)
  assert flat['embedding/kernel'].shape == (patch, patch, 3, width)
  assert flat['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
             ].shape == (width, heads, width // heads)
  assert f'Transformer/encoderblock_{depth - 1}/MlpBlock_3/Dense_1/bias' in flat
  assert ('pre_logits/kernel' in flat) == (rep is not None)
  assert checkpoint.vit_config(flat) == config
  checkpoint.check_against(flat, config)  # No error.
  count = sum(v.size for v in flat.values())
  assert count == vit_param_count(width, depth, mlp, patch, image, rep, classes)
  if known:
    assert count == known
  if image == 384:  # The imagenet21k+imagenet2012 fine-tunes: 577 tokens, no pre_logits.
    assert flat[POS].shape == (1, 577, width) and config.num_tokens == 577
    # Loading one at 224 px resizes the 24x24 grid to 14x14.
    at_224 = checkpoint.vit_config(flat, image_size=224)
    pos = position_embedding.interpolate_posemb(np.zeros(flat[POS].shape, np.float32), 197)
    checkpoint.check_against({**flat, POS: pos}, at_224)


SIZES = [  # width, depth, heads, mlp, patch, image, pre_logits, head
    (32, 1, 2, 64, 4, 16, True, True),
    (48, 2, 4, 40, 8, 32, False, True),
    (32, 3, 2, 72, 16, 32, True, False),
    (48, 2, 4, 96, 8, 24, False, False),
]


@pytest.mark.parametrize('width,depth,heads,mlp,patch,image,pre_logits,head', SIZES)
def test_architecture_is_read_from_the_file(tiny_checkpoint, width, depth, heads, mlp,
                                            patch, image, pre_logits, head):
  path = tiny_checkpoint(width=width, depth=depth, heads=heads, mlp=mlp, patch=patch,
                         image=image, pre_logits=pre_logits, classes=7, head=head)
  config, params = checkpoint.load(path)
  assert config == models_vit.ViTConfig(
      width, depth, heads, mlp, patch, image,
      representation_size=width if (pre_logits and head) else None,
      num_classes=7 if head else None)
  count = vit_param_count(width, depth, mlp, patch, image,
                          width if (pre_logits and head) else None, 7 if head else None)
  assert checkpoint.count_params(params) == count
  assert sum(v.size for v in checkpoint.load_npz(path).values()) == count
  # Arrays arrive as float32 numpy arrays in the model's nested tree.
  assert params['Transformer']['encoderblock']['LayerNorm_0']['scale'].dtype == np.float32
  overridden, _ = checkpoint.load(path, dtype=jnp.bfloat16, approximate_gelu=True)
  assert overridden.dtype == jnp.bfloat16 and overridden.approximate_gelu


def test_headless_load_drops_pre_logits_and_head(tiny_checkpoint):
  config, params = checkpoint.load(tiny_checkpoint(), headless=True)
  assert config.representation_size is None and config.num_classes is None
  assert set(params) == {'embedding', 'cls', 'Transformer'}


# --- Errors: each with its message, and nothing returned. ---

def write_npz(path, flat):
  np.savez(path, **flat)
  return str(path)


def test_missing_file(tmp_path):
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    checkpoint.load(str(tmp_path / 'nowhere' / 'vit.npz'))
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    checkpoint.load_npz(str(tmp_path / 'vit.npz'))


def test_truncated_file(tiny_checkpoint):
  path = tiny_checkpoint()
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(errors.CheckpointError, match='truncated or corrupt'):
    checkpoint.load(path)


def test_corrupt_file(tmp_path):
  path = tmp_path / 'vit.npz'
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(errors.CheckpointError, match='truncated or corrupt'):
    checkpoint.load(str(path))


def test_a_file_that_is_not_a_vit_checkpoint(tmp_path):
  path = write_npz(tmp_path / 'other.npz', {'weights': np.zeros(3), 'bias': np.ones(2)})
  with pytest.raises(errors.CheckpointError,
                     match="is not a ViT checkpoint: it has no 'embedding/kernel'"):
    checkpoint.load(path)


def test_missing_key_is_listed(tiny_checkpoint, tmp_path):
  flat = checkpoint.load_npz(tiny_checkpoint())
  del flat['Transformer/encoderblock_1/LayerNorm_2/scale']
  path = write_npz(tmp_path / 'missing.npz', flat)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.load(path)
  assert 'missing keys (1): Transformer/encoderblock_1/LayerNorm_2/scale' in str(e.value)
  assert 'unexpected' not in str(e.value) and 'shape mismatch' not in str(e.value)


def test_unexpected_key_is_listed(tiny_checkpoint, tmp_path):
  flat = checkpoint.load_npz(tiny_checkpoint())
  flat['Transformer/encoderblock_0/Adapter/kernel'] = np.zeros((32, 8), np.float32)
  path = write_npz(tmp_path / 'extra.npz', flat)
  with pytest.raises(errors.CheckpointError,
                     match=r'unexpected keys \(1\): Transformer/encoderblock_0/Adapter/kernel'):
    checkpoint.load(path)


def test_shape_mismatch_names_key_expected_and_found(tiny_checkpoint, tmp_path):
  flat = checkpoint.load_npz(tiny_checkpoint())
  key = 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'
  flat[key] = np.zeros(33, np.float32)
  path = write_npz(tmp_path / 'shape.npz', flat)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.load(path)
  assert f'shape mismatch for {key}: expected (32,), found (33,)' in str(e.value)


def test_every_problem_is_reported_at_once_and_nothing_is_returned(tiny_checkpoint,
                                                                   tmp_path):
  flat = checkpoint.load_npz(tiny_checkpoint())
  del flat['Transformer/encoderblock_0/LayerNorm_0/bias']
  del flat['head/bias']
  flat['Transformer/encoderblock_1/extra'] = np.zeros(1, np.float32)
  flat['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'] = np.zeros((32, 65),
                                                                          np.float32)
  path = write_npz(tmp_path / 'bad.npz', flat)
  result = 'untouched'
  with pytest.raises(errors.CheckpointError) as e:
    result = checkpoint.load(path)
  assert result == 'untouched'  # Raised: no partial (config, params) comes back.
  message = str(e.value)
  assert ('missing keys (2): Transformer/encoderblock_0/LayerNorm_0/bias, head/bias'
          in message)
  assert 'unexpected keys (1): Transformer/encoderblock_1/extra' in message
  assert ('shape mismatch for Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel: '
          'expected (32, 64), found (32, 65)') in message
  assert isinstance(e.value, ValueError)


def test_position_embedding_that_is_not_a_square_grid(tiny_checkpoint, tmp_path):
  flat = checkpoint.load_npz(tiny_checkpoint())
  flat[POS] = flat[POS][:, :-1]
  with pytest.raises(errors.CheckpointError, match='not 1 \\+ a square grid'):
    checkpoint.load(write_npz(tmp_path / 'pos.npz', flat))


def test_image_size_must_be_a_multiple_of_the_patch(tiny_checkpoint):
  with pytest.raises(errors.CheckpointError, match='not a multiple'):
    checkpoint.load(tiny_checkpoint(), image_size=36)


# --- Position-embedding interpolation. ---

def bilinear_matrix(old, new):
  """(new, old) weights of bilinear resizing with half-pixel centres, edge-clamped
  (PyTorch's F.interpolate(mode='bilinear', align_corners=False))."""
  w = np.zeros((new, old))
  for i in range(new):
    src = max((i + 0.5) * old / new - 0.5, 0.0)
    i0 = min(int(np.floor(src)), old - 1)
    i1 = min(i0 + 1, old - 1)
    frac = src - i0
    w[i, i0] += 1 - frac
    w[i, i1] += frac
  return w


def numpy_resize_posemb(posemb, new):
  old = int(round((posemb.shape[1] - 1) ** 0.5))
  grid = posemb[0, 1:].reshape(old, old, -1)
  w = bilinear_matrix(old, new)
  out = np.einsum('yi,xj,ijc->yxc', w, w, grid)
  return np.concatenate([posemb[:, :1], out.reshape(1, new * new, -1)], axis=1)


def test_interpolation_is_identity_at_the_same_size():
  posemb = np.random.default_rng(0).standard_normal((1, 17, 8)).astype(np.float32)
  np.testing.assert_array_equal(position_embedding.interpolate_posemb(posemb, 17), posemb)


def test_interpolation_2x2_to_4x4_known_values():
  grid = np.array([[0., 4.], [8., 12.]])  # Row-major tokens: (y, x).
  posemb = np.concatenate([[[[7., -7.]]], np.stack([grid, -2 * grid], -1).reshape(1, 4, 2)],
                          axis=1).astype(np.float32)
  out = position_embedding.interpolate_posemb(posemb, 17)
  assert out.shape == (1, 17, 2)
  np.testing.assert_array_equal(out[0, 0], [7., -7.])  # The class token is kept.
  want = np.array([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]], np.float32)
  np.testing.assert_allclose(out[0, 1:, 0].reshape(4, 4), want, atol=1e-6)
  np.testing.assert_allclose(out[0, 1:, 1].reshape(4, 4), -2 * want, atol=1e-6)


def test_interpolation_keeps_a_linear_ramp_linear():
  y, x = np.meshgrid(np.arange(4.), np.arange(4.), indexing='ij')
  ramp = 2 * y + 3 * x + 1
  posemb = np.concatenate([np.full((1, 1, 1), 5.), ramp.reshape(1, 16, 1)], 1)
  out = position_embedding.interpolate_posemb(posemb.astype(np.float32), 65)[0, 1:, 0].reshape(8, 8)
  u = np.arange(8) / 2 - 0.25  # Source coordinate of each new pixel (half-pixel centres).
  want = 2 * u[:, None] + 3 * u[None, :] + 1
  np.testing.assert_allclose(out[1:-1, 1:-1], want[1:-1, 1:-1], atol=1e-5)
  # At the border the source coordinate is clamped to the grid (edge values).
  uc = np.clip(u, 0, 3)
  np.testing.assert_allclose(out, 2 * uc[:, None] + 3 * uc[None, :] + 1, atol=1e-5)
  # Downsampling (as 384 -> 224 px) without antialiasing: plain bilinear too.
  down = position_embedding.interpolate_posemb(posemb.astype(np.float32), 5)[0, 1:, 0]
  u = np.array([0.5, 2.5])
  np.testing.assert_allclose(down.reshape(2, 2), 2 * u[:, None] + 3 * u[None, :] + 1,
                             atol=1e-5)


@pytest.mark.parametrize('old,new', [(3, 5), (6, 4), (2, 7)])
def test_interpolation_matches_pytorch_bilinear(old, new):
  posemb = np.random.default_rng(old).standard_normal((1, 1 + old * old, 3))
  posemb = posemb.astype(np.float32)
  np.testing.assert_allclose(position_embedding.interpolate_posemb(posemb, 1 + new * new),
                             numpy_resize_posemb(posemb, new), atol=1e-5)


def test_interpolation_to_a_non_square_grid_is_an_error():
  with pytest.raises(errors.CheckpointError, match='not a square grid'):
    position_embedding.interpolate_posemb(np.zeros((1, 17, 4), np.float32), 21)


def test_loading_at_another_resolution_interpolates_and_runs(tiny_checkpoint,
                                                             numpy_vit_fn):
  path = tiny_checkpoint()  # 32 px, patch 8: a 4x4 grid.
  config, params = checkpoint.load(path, image_size=48)
  assert config.image_size == 48 and config.num_tokens == 37
  flat = checkpoint.load_npz(path)
  flat[POS] = numpy_resize_posemb(flat[POS], 6)
  np.testing.assert_allclose(params['Transformer']['posembed_input']['pos_embedding'],
                             flat[POS], atol=1e-5)
  x = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
  logits = models_vit.VisionTransformer(config).apply({'params': params}, x)
  assert logits.shape == (2, 10)
  assert np.max(np.abs(np.asarray(logits, np.float64) - numpy_vit_fn(flat, x))) <= 1e-4


# --- Sources: local paths, URLs and published names, the download cache. ---

def test_local_path_is_used_in_place(tiny_checkpoint, tmp_path):
  import pathlib  # pylint: disable=g-import-not-at-top
  path = tiny_checkpoint()
  assert checkpoint.resolve(path, cache_dir=str(tmp_path / 'cache')) == path
  assert checkpoint.resolve(pathlib.Path(path)) == path
  assert not (tmp_path / 'cache').exists()


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('SYNQT_JAX_CACHE', str(tmp_path / 'c'))
  assert checkpoint.default_cache_dir() == str(tmp_path / 'c')
  monkeypatch.delenv('SYNQT_JAX_CACHE')
  assert checkpoint.default_cache_dir() == os.path.join(
      os.path.expanduser('~'), '.cache', 'synqt_jax')


def test_gs_url_maps_to_https():
  assert checkpoint.gcs_to_https('gs://vit_models/imagenet21k/ViT-B_16.npz') == (
      'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz')
  url = checkpoint.gcs_to_https('gs://vit_models/imagenet21k+imagenet2012/R50+ViT-B_16.npz')
  assert urllib.parse.unquote(url) == (
      'https://storage.googleapis.com/vit_models/imagenet21k+imagenet2012/R50+ViT-B_16.npz')


def test_gs_url_resolves_to_its_cached_copy_offline(tiny_checkpoint, tmp_path):
  cached = tmp_path / 'cache' / 'storage.googleapis.com' / 'vit_models' / 'imagenet21k'
  cached.mkdir(parents=True)
  shutil.copy(tiny_checkpoint(), cached / 'ViT-B_16.npz')
  # No network here: this only works because nothing is downloaded.
  path = checkpoint.resolve('gs://vit_models/imagenet21k/ViT-B_16.npz',
                            cache_dir=str(tmp_path / 'cache'))
  assert path == str(cached / 'ViT-B_16.npz')
  same = checkpoint.resolve('ViT-B_16', 'imagenet21k', cache_dir=str(tmp_path / 'cache'))
  assert same == path  # The short name is the same object.


PUBLISHED_NAMES = [
    ('ViT-B_16', 'imagenet21k', 'imagenet21k/ViT-B_16.npz'),
    ('ViT-H_14.npz', 'imagenet21k', 'imagenet21k/ViT-H_14.npz'),
    ('ViT-L_32', 'imagenet21k+imagenet2012', 'imagenet21k+imagenet2012/ViT-L_32.npz'),
    ('R50+ViT-B_16', 'imagenet21k+imagenet2012',
     'imagenet21k+imagenet2012/R50+ViT-B_16.npz'),
    ('B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0', 'augreg',
     'augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'),
    ('Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k'
     '-lr_0.03-res_384', 'augreg',
     'augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012'
     '-steps_20k-lr_0.03-res_384.npz'),
]


@pytest.mark.parametrize('name,collection,path', PUBLISHED_NAMES)
def test_published_url_of_every_collection(name, collection, path):
  assert checkpoint.GCS_ROOT == 'https://storage.googleapis.com/vit_models'
  url = checkpoint.published_url(name, collection)
  assert urllib.parse.unquote(url) == f'{checkpoint.GCS_ROOT}/{path}'
  assert ' ' not in url


def test_published_names_of_all_sizes_and_patches():
  assert checkpoint.COLLECTIONS == ('imagenet21k', 'imagenet21k+imagenet2012', 'augreg')
  for size in ('Ti', 'S', 'B', 'L', 'H'):
    for patch in (32, 16, 14, 8):
      for collection in ('imagenet21k', 'imagenet21k+imagenet2012'):
        assert checkpoint.published_url(f'ViT-{size}_{patch}', collection).endswith(
            f'/ViT-{size}_{patch}.npz')


def test_bad_names_and_collections():
  with pytest.raises(errors.CheckpointError, match='Unknown checkpoint collection'):
    checkpoint.published_url('ViT-B_16', 'imagenet22k')
  with pytest.raises(errors.CheckpointError, match='not a published ViT name'):
    checkpoint.published_url('ViT-B16')
  with pytest.raises(errors.CheckpointError, match='not a published ViT name'):
    checkpoint.resolve('resnet50')


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves the server's directory; counts requests; can cut chosen files short."""

  def log_message(self, *args):  # Quiet.
    pass

  def do_GET(self):
    server = self.server
    server.requests.append(self.path)
    path = urllib.parse.unquote(self.path)
    if path in server.truncate:
      data = open(self.translate_path(self.path), 'rb').read()
      self.send_response(200)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data[:len(data) // 2])
      self.close_connection = True
      return
    super().do_GET()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
  """A local HTTP server on 127.0.0.1 serving `server.root` (a tmp dir)."""
  for var in ('no_proxy', 'NO_PROXY'):  # Never through a proxy from the environment.
    monkeypatch.setenv(var, '127.0.0.1,localhost')
  root = tmp_path / 'www'
  root.mkdir()
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(_Handler, directory=str(root)))
  server.root, server.requests, server.truncate = root, [], set()
  server.url = f'http://127.0.0.1:{server.server_address[1]}'
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()

  def stop():
    if thread.is_alive():
      server.shutdown()
      server.server_close()
      thread.join()

  server.stop = stop
  yield server
  stop()


def publish(server, source, relative):
  target = server.root / relative
  target.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy(source, target)
  return f'{server.url}/{urllib.parse.quote(relative)}'


def files_under(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, fs in os.walk(directory) for f in fs)


def test_url_downloads_once_with_a_progress_bar_then_works_offline(
    http_server, tiny_checkpoint, tmp_path, capsys):
  source = tiny_checkpoint()
  url = publish(http_server, source, 'models/vit.npz')
  cache = str(tmp_path / 'cache')
  path = checkpoint.resolve(url, cache_dir=cache)
  assert http_server.requests == ['/models/vit.npz']
  assert path.startswith(cache) and path.endswith(os.path.join('models', 'vit.npz'))
  assert open(path, 'rb').read() == open(source, 'rb').read()
  assert files_under(cache) == [os.path.relpath(path, cache)]  # No .part left over.
  err = capsys.readouterr().err
  assert 'vit.npz' in err and '100%' in err  # tqdm's bar.
  http_server.stop()
  assert checkpoint.resolve(url, cache_dir=cache) == path
  config, _ = checkpoint.load(url, cache_dir=cache)  # Offline: served from the cache.
  assert config.hidden_size == 32
  assert http_server.requests == ['/models/vit.npz']


@pytest.mark.parametrize('collection', ['imagenet21k', 'imagenet21k+imagenet2012'])
def test_short_name_downloads_from_gcs_root_once(http_server, tiny_checkpoint, tmp_path,
                                                monkeypatch, collection):
  monkeypatch.setattr(checkpoint, 'GCS_ROOT', http_server.url + '/vit_models')
  publish(http_server, tiny_checkpoint(depth=3), f'vit_models/{collection}/ViT-B_16.npz')
  cache = str(tmp_path / 'cache')
  config, _ = checkpoint.load('ViT-B_16', collection=collection, cache_dir=cache)
  assert config.num_layers == 3
  assert len(http_server.requests) == 1
  config, _ = checkpoint.load('ViT-B_16', collection=collection, cache_dir=cache)
  assert config.num_layers == 3
  assert len(http_server.requests) == 1  # The second load read the cache.
  assert files_under(cache) == [os.path.join(
      f'127.0.0.1:{http_server.server_address[1]}', 'vit_models', collection,
      'ViT-B_16.npz')]


def test_truncated_download_leaves_nothing_and_a_retry_works(http_server,
                                                            tiny_checkpoint, tmp_path):
  url = publish(http_server, tiny_checkpoint(), 'vit.npz')
  http_server.truncate.add('/vit.npz')
  cache = str(tmp_path / 'cache')
  with pytest.raises(errors.CheckpointError, match=r'stopped at \d+ of \d+ bytes'):
    checkpoint.resolve(url, cache_dir=cache)
  assert files_under(cache) == []
  http_server.truncate.clear()
  assert os.path.exists(checkpoint.resolve(url, cache_dir=cache))


@pytest.mark.parametrize('content', ['random bytes', 'not a vit'])
def test_corrupt_download_leaves_nothing(http_server, tmp_path, content):
  bad = tmp_path / 'bad.npz'
  if content == 'random bytes':
    bad.write_bytes(np.random.default_rng(0).bytes(10000))
    message = 'truncated or corrupt'
  else:
    np.savez(bad, weights=np.zeros(3))
    message = 'is not a ViT checkpoint'
  url = publish(http_server, bad, 'vit.npz')
  cache = str(tmp_path / 'cache')
  with pytest.raises(errors.CheckpointError, match=message):
    checkpoint.resolve(url, cache_dir=cache)
  assert files_under(cache) == []


def test_unreachable_url_is_a_clear_error(http_server, tmp_path):
  cache = str(tmp_path / 'cache')
  for _ in range(3):
    with pytest.raises(errors.CheckpointError, match='Could not download .*404'):
      checkpoint.resolve(http_server.url + '/missing.npz', cache_dir=cache)
  assert files_under(cache) == []
  # The temp files are closed: no open descriptor points into the cache. (Not a
  # count of all descriptors: libraries' threads open files of their own.)
  targets = []
  for fd in os.listdir('/proc/self/fd'):
    try:
      targets.append(os.readlink(f'/proc/self/fd/{fd}'))
    except OSError:  # Closed since listed.
      pass
  assert not [t for t in targets if t.startswith(cache)]


# --- Checkpoint families: each layout Google's ViTs are stored in. ---

# R50+ViT-B/16's stem: units per stage; its file has 156 stem keys the plain
# ViT lacks (3 root + 16 units x 9 + 3 projections x 3).
R50_UNITS = (3, 4, 9)
R50_STEM_KEYS = 156
# "B/16" layouts at tiny widths: the B names (12 blocks, patch 16, 224 px). The
# SynQT steps run on 2 of the blocks (compiling 12 costs minutes on 2 CPU cores).
B16_LAYOUT = dict(width=32, depth=12, heads=2, mlp=64, patch=16, image=224, classes=5)
TRAINED_DEPTH = 2


def one_line(error):
  message = str(error.value)
  assert '\n' not in message and len(message) < 600, message
  return message


@functools.lru_cache(maxsize=None)
def synqt_step(vit):
  """A jitted SynQT AdamW step on `vit`: (trainable, frozen, images, labels) ->
  (loss, new trainable, the gradient reaching the frozen backbone)."""
  method = methods.SynQT(vit, synqt.SynQTConfig(num_classes=3))
  optimizer = optax.adamw(1e-3)

  def loss_fn(trainable, frozen, images, labels):
    logits = method.apply(trainable, frozen, images, train=True,
                          rngs={'dropout': jax.random.PRNGKey(1),
                                'drop_path': jax.random.PRNGKey(2)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(trainable, frozen, images, labels):
    loss, (grads, frozen_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        trainable, frozen, images, labels)
    updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
    return loss, optax.apply_updates(trainable, updates), frozen_grads

  return method, step


# What only the image path reads (under stop_gradient): the stem, patch embedding,
# class token and position embedding. The blocks' weights do get gradients, as
# the queries pass through them, but are never updated.
IMAGE_PATH_ONLY = ('conv_root/', 'gn_root/', 'block', 'embedding/', 'cls',
                   'Transformer/posembed_input/')


def trains_one_synqt_step(path, **load_kwargs):
  """Loads `path` headless and runs one SynQT step on 2 random images; returns the config."""
  vit, backbone = checkpoint.load(path, headless=True, **load_kwargs)
  method, step = synqt_step(vit)
  frozen = {'backbone': backbone}
  trainable = method.init(jax.random.PRNGKey(0), frozen, None)
  x = np.random.default_rng(0).standard_normal(
      (2, vit.image_size, vit.image_size, 3)).astype(np.float32)
  kv = jax.eval_shape(method.image_kv, frozen, x[:1])  # The K/V the queries read.
  assert kv.shape == (1, vit.num_layers, 2, vit.num_tokens, vit.num_heads, vit.head_dim)
  loss, new, frozen_grads = step(trainable, frozen, x, np.array([0, 2]))
  assert np.isfinite(loss)
  image_path = {k: g for k, g in layouts.flatten(frozen_grads['backbone']).items()
                if k.startswith(IMAGE_PATH_ONLY)}
  assert image_path and not any(np.any(np.asarray(g)) for g in image_path.values())
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         trainable, new)
  assert all(jax.tree.leaves(changed['head'])) and any(jax.tree.leaves(changed['synqt']))
  return vit


def test_r50_vit_b16_has_the_published_layout():
  """R50+ViT-B/16 at full size, on shapes only: the stem's 156 keys, a 1x1 patch
  embedding of the 1024-channel stage-3 map, 197 tokens; published name accepted."""
  vit = models_vit.ViTConfig(768, 12, 12, 3072, 1, 224, 768, 21843,
                             resnet=models_resnet.ResNetConfig(R50_UNITS))
  shapes = checkpoint.expected_shapes(vit)
  plain = checkpoint.expected_shapes(dataclasses.replace(vit, resnet=None, patch_size=16))
  stem = set(shapes) - set(plain)
  assert len(stem) == R50_STEM_KEYS and set(plain) <= set(shapes)
  assert shapes['conv_root/kernel'] == (7, 7, 3, 64)
  assert shapes['block3/unit9/conv3/kernel'] == (1, 1, 256, 1024)
  assert shapes['embedding/kernel'] == (1, 1, 1024, 768)
  assert shapes[POS] == (1, 197, 768) and vit.patch_stride == 16
  assert checkpoint.published_url('R50+ViT-B_16').endswith('/imagenet21k/R50%2BViT-B_16.npz')
  # random_vit writes the same keys and shapes (GroupNorm as the file's (1, 1, 1, C)).
  flat = random_vit.make(width=32, depth=1, heads=2, mlp=64, patch=1, image=32,
                         classes=5, resnet=R50_UNITS, resnet_width=32)
  assert flat['gn_root/scale'].shape == (1, 1, 1, 32)
  assert sum(k.startswith(('conv_root', 'gn_root', 'block')) for k in flat) == R50_STEM_KEYS


@pytest.mark.parametrize('image', [224, 384])
def test_hybrid_r50_b16_loads_and_trains_one_synqt_step(tmp_path, image):
  """R50+ViT-B/16's stem layout at root width 32 (GroupNorm's 32 groups), 2 blocks."""
  flat = random_vit.make(**{**B16_LAYOUT, 'patch': 1, 'image': image,
                            'depth': TRAINED_DEPTH}, resnet=R50_UNITS, resnet_width=32)
  vit = trains_one_synqt_step(write_npz(tmp_path / 'r50.npz', flat))
  assert vit.resnet == models_resnet.ResNetConfig(R50_UNITS, 32)
  assert vit.image_size == image and vit.num_tokens == 1 + (image // 16) ** 2


def test_gap_s16_loads_resizes_and_trains_one_synqt_step(tmp_path):
  """A global-average-pool ViT (no class token, 196 patch tokens), as ViT-S/16 gap."""
  flat = random_vit.make(**{**B16_LAYOUT, 'heads': 4, 'depth': TRAINED_DEPTH},
                         pre_logits=False, classifier='gap')
  path = write_npz(tmp_path / 'gap.npz', flat)
  vit = trains_one_synqt_step(path)
  assert vit.classifier == 'gap' and vit.num_tokens == 196
  # Another resolution resizes the patch grid alone (no class row to keep).
  at_64, params = checkpoint.load(path, image_size=64)
  assert at_64.num_tokens == 16 and params['Transformer']['posembed_input'][
      'pos_embedding'].shape == (1, 16, 32)


@pytest.fixture(scope='module')
def official_b16():
  """B/16 layout (tiny widths) in the published naming, and its logits on 2 images."""
  flat = random_vit.make(**B16_LAYOUT)
  config = checkpoint.vit_config(flat)
  x = np.random.default_rng(3).standard_normal((2, 224, 224, 3)).astype(np.float32)
  logits = models_vit.VisionTransformer(config).apply(
      {'params': layouts.nest(flat)}, x)
  return flat, config, x, logits


LAYOUT_WRITERS = {'linen': random_vit.linen_names, 'opt_target': random_vit.opt_target,
                  'big_vision': random_vit.big_vision,
                  'big_vision_scan': functools.partial(random_vit.big_vision, scan=True)}


@pytest.mark.parametrize('layout', list(LAYOUT_WRITERS))
def test_other_b16_layouts_load_as_the_same_model_and_train(tmp_path, official_b16,
                                                            layout):
  """Linen names, an opt/target/ training state, big_vision params/ (loop and scan)."""
  flat, config, x, logits = official_b16
  path = write_npz(tmp_path / f'{layout}.npz', LAYOUT_WRITERS[layout](flat))
  loaded, params = checkpoint.load(path)
  assert loaded == config
  np.testing.assert_allclose(
      models_vit.VisionTransformer(loaded).apply({'params': params}, x), logits,
      rtol=0, atol=1e-5)
  if not layout.startswith('big_vision'):  # There `cls` absorbs a posemb row.
    assert checkpoint.digest(layouts.flatten(params)) == checkpoint.digest(flat)
  shallow = random_vit.make(**{**B16_LAYOUT, 'depth': TRAINED_DEPTH})
  trains_one_synqt_step(write_npz(tmp_path / f'{layout}_{TRAINED_DEPTH}.npz',
                                  LAYOUT_WRITERS[layout](shallow)))


def test_big_vision_map_head_is_one_clear_line(tmp_path):
  flat = random_vit.big_vision(random_vit.make(width=32, depth=1, heads=2, mlp=64,
                                               patch=8, image=16, classifier='gap'))
  flat['params/MAPHead_0/probe'] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(errors.CheckpointError, match='MAP head') as e:
    checkpoint.load(write_npz(tmp_path / 'map.npz', flat))
  one_line(e)


def test_an_unknown_layout_is_one_line_naming_what_was_found(tmp_path):
  """A 4,000-key file of another kind: one line with counts, not every key."""
  flat = {f'blocks.{i}.mlp.fc{j}.weight': np.zeros(1, np.float32)
          for i in range(1000) for j in range(4)}
  flat['patch_embed.proj.weight'] = np.zeros(1, np.float32)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.load(write_npz(tmp_path / 'timm.npz', flat))
  message = one_line(e)
  assert "has no 'embedding/kernel'" in message and '4001 keys' in message
  assert 'big_vision params/' in message  # Says which layouts would load.


def test_a_plain_vit_loaded_with_a_hybrids_extra_keys_summarises_them(tmp_path):
  """The 156 stem keys beside a plain embedding: one line, counted by stage."""
  flat = random_vit.make(width=32, depth=1, heads=2, mlp=64, patch=1, image=32,
                         classes=5, resnet=R50_UNITS, resnet_width=32)
  config = checkpoint.vit_config(
      {k: v for k, v in layouts.official_layout(flat).items()
       if not k.startswith(('conv_root', 'gn_root', 'block'))})
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.check_against(layouts.official_layout(flat), config)
  message = one_line(e)
  assert 'unexpected keys (156): 156 keys: block1/* (' in message
  assert 'shape mismatch for embedding/kernel' in message
