"""The fields every config has, with the SynQT reference's VTAB-1k recipe.

Task configs (`vtab1k.py`, `fgvc.py`, `tiny.py`) start from `get_config()` and
change only what differs. `{workdir}` in `checkpoint.source` or `data.root` is
replaced by the run's workdir.
"""
import ml_collections
from ml_collections import config_dict

from synqt_jax import input_pipeline


def get_config():
  config = ml_collections.ConfigDict()
  config.method = 'synqt'

  # The frozen backbone: a path, gs:// or https:// URL, or a published name.
  config.checkpoint = ml_collections.ConfigDict(dict(
      source='ViT-B_16', collection='imagenet21k',
      cache_dir=config_dict.placeholder(str),
      # Position-embedding resize at another resolution: 'bilinear' (timm),
      # 'vit_jax' (scipy zoom) or 'bicubic' (DINOv2); None: what the file
      # records (converted DINOv2: bicubic), else bilinear.
      posemb_resize=config_dict.placeholder(str)))

  # `data.image_size` is also the model's resolution (the checkpoint's
  # position embedding is interpolated when it differs).
  config.data = input_pipeline.default_data_config(
      root=config_dict.placeholder(str),
      # VTAB trains on train800val200, which holds val200: no val score.
      val_split=config_dict.placeholder(str))

  config.synqt = ml_collections.ConfigDict(dict(
      token_nums=4, attn_scale=1.0, ffn_scale=0.1, feat_scale=0.1,
      dropout=0.1, drop_path=0.1, head_drop_path=0.3,
      # What online training keeps of the image path for the backward pass:
      # 'keep_kv' (every block's K/V) or 'recompute' (~1/6 of the step's
      # temporaries, twice the image-path compute; synqt_jax/image_path_memory.py).
      image_path_memory='keep_kv'))

  # AdamW (decoupled weight decay on every trainable tensor), learning rate
  # per step: linear warm-up from 0, then half-cycle cosine to min_lr.
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
      batch_size=64, epochs=50, warmup_epochs=10, min_lr=1e-6))

  # feature_cache: 'none' (online), or the training split's image-path K/V
  # computed once and kept in 'host' RAM, on 'disk' (memory-mapped) or on
  # 'device' (sharded), in cache_dtype ('float32' exact, 'bfloat16' half the
  # memory); kept in <workdir>/feature_cache/ and reused while its fingerprint
  # matches. Stochastic depth on the image path is then off (the query path
  # keeps synqt.drop_path). SynQT only.
  # deferred_eval: keep the trainable parameters of each evaluation point and
  # score them all at the end with one backbone pass (SynQT only).
  config.train = ml_collections.ConfigDict(dict(
      feature_cache='none', cache_dtype='float32', deferred_eval=False,
      log_every_steps=10))
  config.eval_every_epochs = 10  # The reference scores test every 10 epochs.
  config.eval_batch_size = 256
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  config.seed = 42
  config.dtype = 'float32'  # Activations; 'bfloat16' halves their memory.
  config.tensorboard = True
  config.demo = None  # tiny.py: generate a checkpoint and data in the workdir.
  return config
