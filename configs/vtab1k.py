"""SynQT on a VTAB-1k task, with the reference's per-task hyper-parameters.

  python launch.py --config configs/vtab1k.py:cifar100 --workdir runs/cifar100

The argument is a task name or alias (`cifar`, `kitti`, ...; see
synqt_jax/data/tasks.py). Data comes from TFDS by default; for NOAH/VPT prepared
folders add `--config.data.source=folder --config.data.root=/path/to/vtab-1k`.
"""
from configs import common
from synqt_jax.data import tasks

# token_nums, attn_scale, ffn_scale, feat_scale (docs/vtab1k_hparams.md).
HPARAMS = {
    'cifar100': (4, 1.0, 0.1, 0.1),
    'caltech101': (4, 0.1, 0.1, 1.0),
    'dtd': (1, 0.1, 0.1, 0.1),
    'oxford_flowers102': (4, 0.1, 0.1, 0.1),
    'oxford_iiit_pet': (1, 0.1, 1.0, 1.0),
    'svhn': (4, 0.1, 1.0, 1.0),
    'sun397': (1, 1.0, 0.1, 0.1),
    'patch_camelyon': (16, 0.1, 1.0, 0.1),
    'eurosat': (16, 1.0, 0.1, 0.1),
    'resisc45': (4, 0.1, 0.1, 0.1),
    'diabetic_retinopathy': (16, 1.0, 0.1, 0.1),
    'clevr_count': (16, 0.1, 0.1, 0.1),
    'clevr_dist': (16, 0.1, 0.1, 0.1),
    'dmlab': (1, 0.1, 0.1, 1.0),
    'kitti_dist': (16, 1.0, 0.1, 0.1),
    'dsprites_loc': (16, 0.1, 0.1, 0.1),
    'dsprites_ori': (4, 0.1, 0.1, 1.0),
    'smallnorb_azi': (16, 0.1, 1.0, 1.0),
    'smallnorb_ele': (16, 1.0, 0.1, 0.1),
}


def get_config(task='cifar100'):
  task = tasks.get_task(task).name
  if task not in HPARAMS:
    raise ValueError(f'{task!r} is not a VTAB-1k task; for FGVC use '
                     'configs/fgvc.py.')
  config = common.get_config()
  config.data.task = task
  synqt = config.synqt
  synqt.token_nums, synqt.attn_scale, synqt.ffn_scale, synqt.feat_scale = (
      HPARAMS[task])
  return config
