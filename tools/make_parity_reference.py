"""Writes the parity reference files by running the public PyTorch SynQT.

Not part of the package or of CI: it runs in a separate environment with torch 2.x
(CPU) and timm 0.4.12, on a copy of https://github.com/taolinzhang/SynQT whose
`synqt.py` it imports at run time (docs/parity.md says how to set both up):

  python tools/make_parity_reference.py SYNQT_DIR
      writes tests/data/parity/<case>.npz for every case in CASES;
  python tools/make_parity_reference.py SYNQT_DIR --rerun tests/data/official_synqt_t4.npz [--write NEW.npz]
      reruns the reference on that file's own images and parameters, prints how far
      its stored logits, loss and gradients are from the rerun ones, and with
      --write saves the file with the rerun ones.

Each case is a random backbone (`random_vit.make(**backbone)`, official .npz layout,
loaded with timm's own .npz loader), random parameters under the reference's names
(`random_vit.reference_parameters`) and a random batch, all from the case's seed.
The reference runs in eval mode (no dropout, no stochastic depth).
"""
import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import types

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from synqt_jax.testing import random_vit

# Width 768 and depth 12 are fixed by the reference (`range(12)`, `view(bs, 1, 768)`,
# 37 = 1 + 3 * 12 combine weights, 768-wide adapters); heads, MLP width, patch and
# image size are free, so the cases use 5 tokens (32 x 32 images, 16 x 16 patches).
SMALL_BACKBONE = dict(width=768, depth=12, heads=6, mlp=192, patch=16, image=32,
                      classes=10, pre_logits=False)
BATCH = 3
# name -> (T, classes, (attn_scale, ffn_scale, feat_scale), seed); the T, classes
# and scales are VTAB-1k tasks' (docs/vtab1k_hparams.md: pets, caltech101, kitti).
CASES = {
    f't{t}_seed{seed}': (t, classes, scales, seed)
    for t, classes, scales in ((1, 37, (0.1, 1.0, 1.0)), (4, 102, (0.1, 0.1, 1.0)),
                               (16, 4, (1.0, 0.1, 0.1)))
    for seed in (1, 2)
}
# Gradients kept in the small cases: every tensor outside the per-block modules
# (queries of all blocks, scales, head side) and all of the first and last block's.
PER_BLOCK = re.compile(r'^synqt\.(prompt_ffn|qsm_block|pre_norm)\.(\d+)\.')


def import_reference(synqt_dir):
  """The reference's synqt.py as a module, with what it needs on a CPU-only torch."""
  try:
    import torchvision
  except ImportError:  # timm 0.4.12 imports torchvision.transforms; nothing here uses it.
    stub = types.ModuleType('torchvision')
    stub.transforms = types.ModuleType('torchvision.transforms')
    stub.transforms.functional = types.ModuleType('torchvision.transforms.functional')
    stub.transforms.InterpolationMode = types.SimpleNamespace(
        NEAREST='nearest', BILINEAR='bilinear', BICUBIC='bicubic', BOX='box',
        HAMMING='hamming', LANCZOS='lanczos')
    for module in (stub, stub.transforms, stub.transforms.functional):
      module.__getattr__ = lambda name: object
      sys.modules[module.__name__] = module
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # `torch.ones(bs, 1).cuda()`.
  spec = importlib.util.spec_from_file_location(
      'synqt_reference', os.path.join(synqt_dir, 'synqt.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_model(ref, flat, tokens, classes, scales):
  """timm's ViT loaded from the official-layout `flat` backbone, made SynQT by `ref`."""
  import timm  # Only after import_reference: timm needs its torchvision stand-in.
  block = 'Transformer/encoderblock_0/'
  patch, _, _, width = flat['embedding/kernel'].shape
  grid = int(round((flat['Transformer/posembed_input/pos_embedding'].shape[1] - 1) ** .5))
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=grid * patch, patch_size=patch, embed_dim=width,
      depth=sum(k.endswith('/LayerNorm_0/scale') for k in flat),
      num_heads=flat[block + 'MultiHeadDotProductAttention_1/query/kernel'].shape[1],
      mlp_ratio=flat[block + 'MlpBlock_3/Dense_0/kernel'].shape[1] / width,
      num_classes=flat['head/kernel'].shape[1], drop_path_rate=0.1)
  with tempfile.NamedTemporaryFile(suffix='.npz') as f:
    np.savez(f, **flat)
    f.flush()
    model.load_pretrained(f.name)
  attn_scale, ffn_scale, feat_scale = scales
  ref.set_synqt(types.SimpleNamespace(token_nums=tokens, attn_scale=attn_scale,
                                      ffn_scale=ffn_scale, feat_scale=feat_scale), model)
  model.reset_classifier(classes)
  return model.eval()


def trainable(model):
  """The reference's trainable tensors (`synqt.*`, `head.*`); freezes the rest."""
  params = {}
  for name, p in model.named_parameters():
    p.requires_grad = name.startswith(('synqt.', 'head.'))
    if p.requires_grad:
      params[name] = p
  return params


def run(model, params, images, labels):
  """Logits, mean cross-entropy and its gradient for every trainable tensor."""
  tensors = trainable(model)
  with torch.no_grad():
    for name, value in params.items():
      tensors[name].copy_(torch.from_numpy(np.asarray(value)))
  logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  loss = F.cross_entropy(logits, torch.from_numpy(labels).long())
  loss.backward()
  grads = {name: (np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy())
           for name, p in tensors.items()}
  return logits.detach().numpy(), loss.item(), grads


def make_case(ref, tokens, classes, scales, seed):
  """The arrays of one small case's reference file."""
  backbone = {**SMALL_BACKBONE, 'seed': seed}
  flat = random_vit.make(**backbone)
  model = reference_model(ref, flat, tokens, classes, scales)
  shapes = {name: list(p.shape) for name, p in trainable(model).items()}
  init = {'seed': seed, 'shapes': shapes,
          'scales': dict(zip(('attn_scale', 'ffn_scale', 'feat_scale'), scales))}
  params = random_vit.reference_parameters(shapes, seed, init['scales'])
  rng = np.random.default_rng([seed, 1])
  image = backbone['image']
  images = rng.standard_normal((BATCH, image, image, 3)).astype(np.float32)
  labels = rng.integers(0, classes, BATCH)
  logits, loss, grads = run(model, params, images, labels)
  last = str(backbone['depth'] - 1)
  kept = {name: g for name, g in grads.items()
          if not (m := PER_BLOCK.match(name)) or m.group(2) in ('0', last)}
  return {'images': images, 'labels': labels, 'logits': logits, 'loss': np.float32(loss),
          'n_trainable': sum(int(np.prod(s)) for s in shapes.values()),
          'backbone': json.dumps(backbone), 'param_init': json.dumps(init),
          **{'grad:' + k: v for k, v in kept.items()}}


def rerun(ref, path, write=None):
  """Recomputes a full-format file (`param:*` arrays), prints the differences and,
  with `write`, saves the file with the recomputed logits, loss and gradients."""
  with np.load(path) as f:
    stored = dict(f)
  backbone = json.loads(str(stored['backbone'])) if 'backbone' in stored else {}
  params = {k[len('param:'):]: v for k, v in stored.items() if k.startswith('param:')}
  scales = tuple(float(params[k].reshape(-1)[0]) for k in (
      'synqt.qsm_block.0.attn_scale', 'synqt.qsm_block.0.ffn_scale', 'synqt.feat_scale'))
  model = reference_model(ref, random_vit.make(**backbone), params['synqt.q'].shape[1],
                          params['head.weight'].shape[0], scales)
  logits, loss, grads = run(model, params, stored['images'], stored['labels'])
  print(f'{path}: logits max |stored - rerun| '
        f'{np.max(np.abs(logits - stored["logits"])):.3e}; loss stored '
        f'{float(stored["loss"]):.7f}, rerun {loss:.7f}')
  worst = max((np.max(np.abs(g - stored['grad:' + k])) / max(np.max(np.abs(g)), 1e-30), k)
              for k, g in grads.items())
  print(f'gradients: {len(grads)} tensors; worst max |stored - rerun| / max |rerun| '
        f'{worst[0]:.3e} ({worst[1]})')
  if write:
    np.savez(write, **{**stored, 'logits': logits, 'loss': np.float32(loss),
                       **{'grad:' + k: g for k, g in grads.items()}})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('synqt_dir', help='a copy of taolinzhang/SynQT (holds synqt.py)')
  ap.add_argument('--out', default=os.path.join(ROOT, 'tests', 'data', 'parity'))
  ap.add_argument('--case', action='append', choices=sorted(CASES),
                  help='only these cases (repeatable); default all')
  ap.add_argument('--rerun', help='a full-format reference file to recompute')
  ap.add_argument('--write', help='with --rerun: where to save the recomputed file')
  a = ap.parse_args()
  if not os.path.exists(os.path.join(a.synqt_dir, 'synqt.py')):
    sys.exit(f'{a.synqt_dir!r} has no synqt.py: pass a copy of taolinzhang/SynQT.')
  torch.use_deterministic_algorithms(True)
  ref = import_reference(a.synqt_dir)
  if a.rerun:
    rerun(ref, a.rerun, a.write)
    return
  os.makedirs(a.out, exist_ok=True)
  for name in a.case or sorted(CASES):
    path = os.path.join(a.out, name + '.npz')
    np.savez_compressed(path, **make_case(ref, *CASES[name]))
    print(f'wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)')


if __name__ == '__main__':
  main()
