"""SynQT on an FGVC dataset (VPT-prepared folders), with VPT's FGVC recipe.

  python launch.py --config configs/fgvc.py:cub200 --workdir runs/cub200 \
      --config.data.root=/path/to/CUB_200_2011

Where each number comes from (the SynQT reference publishes no FGVC
settings; VPT = github.com/KMnP/vpt):
  - augmentation: VPT's src/data/transforms.py at 224: training Resize(256),
    RandomCrop(224), RandomHorizontalFlip; evaluation Resize(256),
    CenterCrop(224) (`data.augmentation='vpt'`, augment.CropFlipSource).
  - epochs 100, warm-up 10, batch 128 (cosine schedule): VPT's
    configs/base-prompt.yaml (TOTAL_EPOCH, WARMUP_EPOCH, BATCH_SIZE), the same
    for all five datasets.
  - optimizer: SynQT's AdamW with its VTAB-1k lr 1e-3 and weight decay 1e-2
    (configs/common.py). VPT's per-dataset numbers (configs/prompt/*.yaml:
    BASE_LR 0.1 / WEIGHT_DECAY 0.01 for CUB and NABirds, 0.001 / 0.0001 for
    Flowers, Dogs and Cars) are for SGD with momentum on prompts and coupled
    weight decay, which optax.sgd does not take: they are not used; sweep
    optim.lr and optim.weight_decay instead.
  - SynQT's T=4 and scales 1.0/0.1/0.1: its VTAB-1k defaults.
Training is on train+val (the final-run protocol). For model selection:
`launch.py sweep ... --select_on val` (train on train, choose on val, retrain
on train+val). The feature cache is refused with augmentation on.
"""
from configs import common
from synqt_jax.data import tasks

# VPT's configs/base-prompt.yaml (every FGVC dataset).
VPT_SCHEDULE = dict(epochs=100, warmup_epochs=10, batch_size=128)


def get_config(task='cub200'):
  task = tasks.get_task(task)
  if task.is_vtab:
    raise ValueError(f'{task.name!r} is a VTAB-1k task; use configs/vtab1k.py.')
  config = common.get_config()
  config.data.update(dict(source='folder', task=task.name,
                          train_split='train+val', test_split='test',
                          augmentation='vpt'))
  config.optim.update(VPT_SCHEDULE)
  return config
