"""The fields every config has, with the SynQT reference's VTAB-1k recipe.

Task configs (`vtab1k.py`, `fgvc.py`, `tiny.py`) start from `get_config()` and
change only what differs. `{workdir}` in `backbone.source` or `data.root` is
replaced by the run's workdir. Each tuning method's own section
(`config.synqt`, `config.lora`, `config.full`) comes from its fields in the
registry, synqt_jax/models/methods.py.
"""
import ml_collections
from ml_collections import config_dict

from synqt_jax.config import fields as config_fields
from synqt_jax.models import methods


def get_config():
  config = ml_collections.ConfigDict()
  config.method = 'synqt'  # One of methods.METHODS.

  # The frozen pre-trained backbone: a path, gs:// or https:// URL, or a
  # published name. (`config.checkpoint` is a deprecated alias of it.)
  config.backbone = ml_collections.ConfigDict(dict(
      source='ViT-B_16', collection='imagenet21k',
      cache_dir=config_dict.placeholder(str),
      # Position-embedding resize at another resolution: 'bilinear' (timm),
      # 'vit_jax' (scipy zoom) or 'bicubic' (DINOv2); None: what the file
      # records (converted DINOv2: bicubic), else bilinear.
      posemb_resize=config_dict.placeholder(str)))

  # `data.image_size` is also the model's resolution (the checkpoint's
  # position embedding is interpolated when it differs).
  config.data = ml_collections.ConfigDict({
      **config_fields.DATA_DEFAULTS, 'root': config_dict.placeholder(str),
      # None: the task's, or what your own data shows (settable as an int).
      'num_classes': config_dict.placeholder(int),
      # VTAB trains on train800val200, which holds val200: no val score.
      'val_split': config_dict.placeholder(str)})

  for name, registered in methods.REGISTRY.items():
    if registered.fields:
      config[name] = config_fields.section(registered.fields)

  # optax.<name>(learning_rate, **kwargs): b1, b2, eps and weight_decay where
  # it takes them, and `optax` for its other arguments, e.g. name='sgd',
  # optax={'momentum': 0.9} (weight_decay then adds to the gradient, as
  # torch.optim.SGD's); synqt_jax/training/optimizer.py.
  config.optim = ml_collections.ConfigDict(config_fields.OPTIM_DEFAULTS)

  # feature_cache: 'none' (online), or the training split's image-path K/V
  # computed once, in cache_dtype ('float32' exact, 'bfloat16' half the
  # memory), and held in 'host' RAM only (nothing written to disk; rebuilt on
  # resume), or written to <workdir>/feature_cache/ and reused by later runs
  # while its fingerprint matches: memory-mapped from there ('disk', for sets
  # larger than RAM) or sharded over the accelerators ('device'). Stochastic
  # depth on the image path is then off (the query path keeps
  # synqt.drop_path). SynQT, and linear (its pooled features: exactly online).
  # deferred_eval: keep the trainable parameters of each evaluation point and
  # score them all at the end with one backbone pass (SynQT, linear).
  config.train = ml_collections.ConfigDict(dict(
      feature_cache='none', cache_dtype='float32', deferred_eval=False,
      log_every_steps=10))
  config.eval_every_epochs = 10  # The reference scores test every 10 epochs.
  config.eval_batch_size = 256
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  config.seed = 42
  # Activations (one of models_vit.DTYPES); 'bfloat16' halves their memory.
  config.dtype = 'float32'
  # The frozen backbone's weights on the devices (one of models_vit.DTYPES):
  # 'bfloat16' halves them, rounded once at load; they compute in `dtype`.
  # Not with method='full', whose backbone is the trainable state.
  config.backbone_dtype = 'float32'
  config.tensorboard = True
  # 'module.function' called with the resolved config before the run reads
  # its backbone and data (tiny.py: synqt_jax.demo.prepare writes them).
  config.prepare = config_dict.placeholder(str)
  config.demo = None  # tiny.py: the generated checkpoint's and data's sizes.
  config_fields.add_aliases(config)
  return config
