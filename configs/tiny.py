"""A tiny offline run: a random 1-block ViT, generated 32x32 images, ~30 s on a CPU.

  python launch.py --config configs/tiny.py --workdir runs/tiny

The first run writes the checkpoint (tiny_vit.npz) and the data set
(tiny_data/, a NOAH-layout prepared folder) into the workdir; see
synqt_jax/demo.py. It exercises the same path as a real task, in seconds.
"""
import ml_collections

from configs import common


def get_config():
  config = common.get_config()
  config.backbone.source = '{workdir}/tiny_vit.npz'
  # Any 10-class task's folder layout will do; the images are generated.
  config.data.update(dict(source='folder', task='eurosat',
                          root='{workdir}/tiny_data', image_size=32,
                          normalization='inception'))
  config.prepare = 'synqt_jax.demo.prepare'
  config.demo = ml_collections.ConfigDict(dict(
      width=32, depth=1, heads=2, mlp=64, patch=8, scale=0.1, seed=0,
      train_examples=320, test_examples=200))
  config.optim.update(dict(batch_size=32, epochs=10, warmup_epochs=2,
                           lr=3e-3))
  config.eval_every_epochs = 5
  config.eval_batch_size = 64
  config.checkpoint_every_steps = 25
  config.train.log_every_steps = 5
  return config
