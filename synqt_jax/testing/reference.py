"""Parameters of the PyTorch reference SynQT, converted to this package's tree.

The rule, with no per-tensor table: indices join their module name
(`qsm_block.3` -> `qsm_block_3`); an Adapter's inner `mlp` wrapper disappears
(`prompt_ffn.0.mlp.fc1` -> `prompt_ffn_0/fc1`); the combine block's Linear
(`out_combine.get_weight.fc1`) is `combine`; Linear weights (out, in) become
kernels (in, out); LayerNorm weights become scales. The reference's `pre_norm.*`
and `out_combine.weight` are created but never used: they are skipped.
"""
import re
from typing import Mapping

import numpy as np

from synqt_jax.models import synqt
from synqt_jax.weights import layouts

UNUSED = re.compile(r'^synqt\.(pre_norm\.\d+\.(weight|bias)|out_combine\.weight)$')
RENAMES = {'out_combine/get_weight/fc1': 'combine'}


def is_unused(name):
  return bool(UNUSED.match(name))


def tree_path(name, ndim):
  """The key path in our tree of reference tensor `name` with `ndim` dimensions."""
  parts = []
  for part in name.split('.'):
    if part.isdigit() and parts:
      parts[-1] += '_' + part
    else:
      parts.append(part)
  parts = [p for i, p in enumerate(parts)
           if not (p == 'mlp' and i + 1 < len(parts) and parts[i + 1] in ('fc1', 'fc2'))]
  *module, leaf = parts
  module = '/'.join(module)
  for old, new in RENAMES.items():
    module = re.sub(rf'(^|/){re.escape(old)}$', rf'\g<1>{new}', module)
  if leaf == 'weight':
    leaf = 'kernel' if ndim == 2 else 'scale'
  return tuple(module.split('/')) + (leaf,)


def convert(tensors: Mapping[str, np.ndarray]):
  """`{reference name: array}` -> our trainable tree `{'synqt': ..., 'head': ...}`."""
  flat = {}
  for name, value in tensors.items():
    if is_unused(name):
      continue
    value = np.asarray(value, np.float32)
    path = tree_path(name, value.ndim)
    flat['/'.join(path)] = value.T if path[-1] == 'kernel' else value
  return layouts.nest(flat)  # Per-layer modules stacked, as `init` holds them.


def synqt_config(tensors: Mapping[str, np.ndarray], **overrides):
  """The `SynQTConfig` a reference parameter set implies (T, scales, classes)."""
  scalar = lambda name: float(np.asarray(tensors[name]).reshape(-1)[0])
  return synqt.SynQTConfig(
      num_classes=int(tensors['head.weight'].shape[0]),
      token_nums=int(tensors['synqt.q'].shape[1]),
      attn_scale=scalar('synqt.qsm_block.0.attn_scale'),
      ffn_scale=scalar('synqt.qsm_block.0.ffn_scale'),
      feat_scale=scalar('synqt.feat_scale'),
      **overrides)


def unused_count(tensors: Mapping[str, np.ndarray]) -> int:
  """How many of the reference's trainable values its forward pass never reads."""
  return int(sum(np.size(v) for k, v in tensors.items() if is_unused(k)))
