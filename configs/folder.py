"""SynQT on your own images: an ImageFolder or NOAH/VPT-list folder, any task name.

  python launch.py --config configs/folder.py:/data/flowers --workdir runs/flowers \
      --config.backbone.source=dinov2_s14.npz

The argument is the dataset directory: `<dir>/<split>/<class name>/*.jpg`
(ImageFolder; classes sorted by name) or `<dir>/<split>.txt` lists of
'<image path> <label>' (NOAH/VPT). The task is named after the directory; the
number of classes is read from the data (or set data.num_classes). Splits:
train, test, and val where the directory has one (scored beside test). The input normalisation is the one the checkpoint records
(`python -m synqt_jax.convert` writes it; for Google's .npz files set
data.normalization to 'inception' or 'imagenet'). Otherwise the VTAB-1k recipe.
"""
import os

from configs import common


def get_config(root=''):
  config = common.get_config()
  root = os.path.abspath(os.path.expanduser(root)) if root else ''
  has_val = any(os.path.exists(os.path.join(root, name))
                for name in ('val', 'val.txt', 'val.json'))
  config.data.update(dict(
      source='folder', task=os.path.basename(root.rstrip(os.sep)) or 'folder',
      root=root, train_split='train', val_split='val' if has_val else None,
      test_split='test', normalization='auto'))
  return config
