"""One point of benchmarks/vs_reference.py for the PyTorch reference, in its own venv.

  python reference_step.py SYNQT_PY BACKBONE_NPZ --batch 16 --tokens 4 --steps 3

SYNQT_PY is the reference's own synqt.py (a fetched copy, never part of this
repository); it is imported as it is and set on timm 0.4.12's ViT-B/16 as the
reference's training script does (drop path 0.1, 100 classes, AdamW on the
`synqt` and `head` parameters). Prints one JSON line: seconds per train step
(median after one warm-up step), images per second and the process's peak
resident memory. Imports only torch, timm and numpy: it runs in the venv
that vs_reference.py makes, not in this project's.
"""
import argparse
import importlib.util
import json
import resource
import sys
import time
import types

import numpy as np
import torch
import timm

NUM_CLASSES = 100


def reference_module(path):
  spec = importlib.util.spec_from_file_location('synqt_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('synqt_py')
  parser.add_argument('backbone_npz')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--tokens', type=int, default=4)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--threads', type=int, default=0)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.Tensor.cuda = lambda self, *a, **k: self  # The reference calls .cuda().
  reference = reference_module(args.synqt_py)
  model = timm.create_model('vit_base_patch16_224_in21k',
                            checkpoint_path=args.backbone_npz,
                            drop_path_rate=0.1)
  reference.set_synqt(types.SimpleNamespace(
      token_nums=args.tokens, attn_scale=1.0, ffn_scale=0.1, feat_scale=0.1),
                      model)
  model.reset_classifier(NUM_CLASSES)
  trainable = []
  for name, parameter in model.named_parameters():
    if 'head' in name or 'synqt' in name:
      trainable.append(parameter)
    else:
      parameter.requires_grad = False
  optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-2)
  model.train()
  images = torch.randn(args.batch, 3, 224, 224)
  labels = torch.randint(0, NUM_CLASSES, (args.batch,))
  times = []
  for _ in range(args.steps + 1):
    start = time.perf_counter()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
  step = float(np.median(times[1:]))
  print(json.dumps({
      'implementation': 'reference', 'batch': args.batch,
      'tokens': args.tokens, 'threads': torch.get_num_threads(),
      'step_s': step, 'img_per_s': args.batch / step, 'compile_s': None,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'torch': torch.__version__, 'timm': timm.__version__}))


if __name__ == '__main__':
  sys.exit(main())
