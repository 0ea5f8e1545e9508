"""SynQT on an FGVC dataset (VPT-prepared folders), with the VTAB-1k recipe.

  python launch.py --config configs/fgvc.py:cub200 --workdir runs/cub200 \
      --config.data.root=/path/to/CUB_200_2011

The reference publishes no FGVC hyper-parameters, so these are its VTAB-1k
defaults (T=4, scales 1.0/0.1/0.1). Training is on train+val (the final-run
protocol); for model selection use `--config.data.train_split=train
--config.data.val_split=val`.
"""
from configs import common
from synqt_jax import tasks


def get_config(task='cub200'):
  task = tasks.get_task(task)
  if task.is_vtab:
    raise ValueError(f'{task.name!r} is a VTAB-1k task; use configs/vtab1k.py.')
  config = common.get_config()
  config.data.update(dict(source='folder', task=task.name,
                          train_split='train+val', test_split='test'))
  return config
