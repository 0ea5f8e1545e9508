"""Tuning methods behind one functional interface, so one trainer serves them all.

A method splits the parameters into `trainable` (optimised, checkpointed,
exported) and `frozen` (the pre-trained backbone: never differentiated, never in
the optimizer) and computes logits from both:

  method.init(rng, frozen, images) -> trainable
  method.apply(trainable, frozen, images, train=False, rngs=None) -> logits

`frozen` is `{'backbone': <the checkpoint's tree>}` for every method; `rngs` maps
Flax RNG streams ('dropout', 'drop_path') to keys in training.

A method that trains from a feature cache (SynQT, the linear probe) also has
`image_kv(frozen, images)`: what the cache stores per image (`cache_row_shape`:
SynQT's per-block K/V, the probe's pooled features), `apply_kv(trainable,
frozen, rows, ...)`: logits from those rows, and `cache_note`: how training on
them differs from online training.

`REGISTRY` lists every method by name (`config.method`) with the fields of its
own config section `config.<name>`: the defaults configs/common.py sets, the
checks config_validation.py runs and what an export keeps all come from them.
`create_method` builds the method a config names on its backbone
(`config.backbone`).
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from synqt_jax.config import fields as config_fields
from synqt_jax.data import data_config
from synqt_jax.models import baselines
from synqt_jax.models import recompute
from synqt_jax.models import synqt
from synqt_jax.models import vit as models_vit
from synqt_jax.weights import checkpoint
from synqt_jax.weights import layouts


@dataclasses.dataclass(frozen=True)
class SynQT:
  """The paper's method: trainable `synqt` and `head` beside the frozen backbone."""
  vit: models_vit.ViTConfig
  config: synqt.SynQTConfig

  @property
  def model(self):
    return synqt.SynQTModel(self.vit, self.config)

  def init(self, rng, frozen, images):
    """Fresh trainable parameters; `head_norm` starts from the encoder norm."""
    del images  # The trainable modules' shapes follow from the configs.
    # Op by op, not jitted: the same values, but compiling the L layers'
    # initialisers took 35 s and 0.8 GB (ViT-B/16 on a CPU); eagerly 9 s.
    trainable = self.model.init(rng, method=synqt.SynQTModel.init_trainable)['params']
    # Each layer's modules are created (and drawn) one by one, then stacked
    # for the scan over the layers (`layouts.nest`).
    trainable = layouts.nest(layouts.flatten(trainable))
    encoder_norm = frozen['backbone']['Transformer']['encoder_norm']
    trainable['synqt'] = {**trainable['synqt'], 'head_norm': jax.tree.map(
        lambda x: x.astype(jnp.float32), dict(encoder_norm))}  # Trainable: float32.
    return trainable

  def apply(self, trainable, frozen, images, train=False, rngs=None):
    if train and self.config.image_path_memory == 'recompute':
      return recompute.training_logits(self, trainable, frozen, images,
                                       rngs)
    return self.model.apply({'params': {**trainable, **frozen}}, images,
                            train=train, rngs=rngs)

  cache_note = ('stochastic depth on the image path is off (its K/V are computed '
                'once, without it); the query path keeps its drop path '
                '(config.synqt.drop_path) as configured')

  @property
  def cache_row_shape(self):
    vit = self.vit
    return (vit.num_layers, 2, vit.num_tokens, vit.num_heads, vit.head_dim)

  def image_kv(self, frozen, images):
    """The per-block K/V of `images` (B, L, 2, N, H, D/H): what a feature cache stores."""
    return self.model.apply({'params': frozen}, images,
                            method=synqt.SynQTModel.image_kv)

  def apply_kv(self, trainable, frozen, kv, train=False, rngs=None):
    """Logits from stored K/V (image-path stochastic depth is necessarily off)."""
    return self.model.apply({'params': {**trainable, **frozen}}, kv, train=train,
                            rngs=rngs, method=synqt.SynQTModel.logits_from_kv)

  def query_attention(self, trainable, frozen, images):
    """Per-layer attention of the queries over the image tokens, (B, L, H, T, N)."""
    return self.model.apply({'params': {**trainable, **frozen}}, images,
                            method=synqt.SynQTModel.query_attention)


def trainable_count(trainable: Any) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(trainable)))


# --- The registry: every method the trainer can run, by name. ---


@dataclasses.dataclass(frozen=True)
class Registered:
  """A method as the trainer knows it: its class, config section and builder.

  `fields` are the section `config.<name>`: their values are the `options`
  given to `build(vit, num_classes, options, config)` (default:
  `cls(vit, num_classes, **options)`); `config` is the whole run config (an
  export's has no `train` section). `check(config, check_field)` refuses
  combinations of fields (config/validation.py passes its checker:
  `check_field(name, ok, expected)`). `init_only`: fields that only set
  initial trainable values, so a sweep's members differing in them (and in
  the optimizer's settings) run the same program, stacked.
  """
  cls: type
  fields: tuple[config_fields.Field, ...] = ()
  build: Callable[..., Any] | None = None
  check: Callable[..., None] | None = None
  init_only: tuple[str, ...] = ()

  @property
  def reads_cached_kv(self) -> bool:
    """Whether it can train on, and be scored from, stored image-path K/V."""
    return hasattr(self.cls, 'apply_kv')

  @property
  def trains_backbone(self) -> bool:
    """Whether the pre-trained weights are trainable state (full fine-tuning)."""
    return getattr(self.cls, 'trains_backbone', False)

  def create(self, vit, num_classes, options, config):
    if self.build is not None:
      return self.build(vit, num_classes, options, config)
    return self.cls(vit, num_classes, **options)


def _rate(name, default):
  return config_fields.Field(name, default, config_fields.fraction,
                             'a rate in [0, 1)')


def _drop_path(default):
  """A baseline's backbone stochastic depth: block i drops at i * rate / (L - 1)."""
  return _rate('drop_path', default)


def _synqt(vit, num_classes, options, config):
  """With a feature cache the image path has no stochastic depth: its cached
  K/V are computed once, without it (SynQTConfig.image_drop_path=False)."""
  cached = config.get('train', {}).get('feature_cache', 'none') != 'none'
  return SynQT(vit, synqt.SynQTConfig(num_classes=num_classes,
                                      image_drop_path=not cached, **options))


def _check_synqt(config, check_field):
  """bfloat16 K/V are how keep_kv holds them online."""
  check_field('synqt.kv_dtype',
              lambda x: x == 'float32' or config.synqt.image_path_memory == 'keep_kv',
              "'float32' with synqt.image_path_memory='recompute' (it keeps no "
              "K/V to round), or set synqt.image_path_memory='keep_kv'")
  check_field('synqt.kv_dtype',
              lambda x: x == 'float32' or config.train.feature_cache == 'none',
              "'float32' with a feature cache (its K/V are stored in "
              "train.cache_dtype: set train.cache_dtype='bfloat16' instead)")


_real = functools.partial(config_fields.Field, ok=config_fields.is_real,
                          expected='a number')

# Listed least accelerator memory first (the benchmarks' table order).
REGISTRY = {
    'linear': Registered(baselines.LinearProbe),
    'synqt': Registered(
        SynQT, build=_synqt, check=_check_synqt,
        init_only=('attn_scale', 'ffn_scale', 'feat_scale'), fields=(
            config_fields.Field('token_nums', 4, config_fields.positive_int,
                                'a positive int (1, 4, 16)'),
            _real('attn_scale', 1.0), _real('ffn_scale', 0.1),
            _real('feat_scale', 0.1),
            _rate('dropout', 0.1), _rate('drop_path', 0.1),
            _rate('head_drop_path', 0.3),
            # What online training keeps of the image path for the backward
            # pass: 'keep_kv' (every block's K/V) or 'recompute' (~1/6 of the
            # step's temporaries, twice the image-path compute).
            config_fields.Field('image_path_memory', 'keep_kv',
                                lambda x: x in synqt.IMAGE_PATH_MEMORY,
                                f'one of {synqt.IMAGE_PATH_MEMORY}'),
            # keep_kv's K/V as computed ('float32') or rounded to 'bfloat16'
            # (half of what the backward pass keeps; gradients within ~1e-2).
            config_fields.Field('kv_dtype', 'float32',
                                lambda x: x in models_vit.DTYPES,
                                f'one of {tuple(models_vit.DTYPES)}'),
            # Images the frozen image path runs at once (0: automatic, one
            # on a CPU, the whole batch on a GPU/TPU; same numbers).
            config_fields.Field('image_path_batch', 0,
                                lambda x: config_fields.is_int(x) and x >= 0,
                                'an int >= 0 (0: automatic)'))),
    'lora': Registered(
        baselines.LoRA, fields=(
            config_fields.Field('rank', 8, config_fields.positive_int,
                                'a positive int'),
            # The update is scaled by alpha / rank.
            config_fields.Field('alpha', 8.0,
                                lambda x: config_fields.is_real(x) and x > 0,
                                'a number > 0'),
            _drop_path(0.0))),
    'full': Registered(baselines.FullFineTune, fields=(_drop_path(0.1),)),
}
METHODS = tuple(REGISTRY)
# Those that train from a feature cache and score by deferred evaluation.
CACHE_METHODS = tuple(name for name, entry in REGISTRY.items() if entry.reads_cached_kv)


def registered(name) -> Registered:
  if name not in REGISTRY:
    raise ValueError(f'method={name!r}; expected one of {METHODS}.')
  return REGISTRY[name]


def create(name, vit: models_vit.ViTConfig, num_classes, config):
  """The method called `name` for a ViT, with its options from `config.<name>`.

  A section absent from `config` (an older export's) takes the defaults.
  """
  entry = registered(name)
  section = config.get(name)
  options = {f.name: f.default for f in entry.fields}
  options.update(section.to_dict() if section is not None else {})
  return entry.create(vit, num_classes, options, config)


def from_config(config, vit: models_vit.ViTConfig):
  """The method `config.method` names, for the task `config.data.task`."""
  return create(config.method, vit,
                data_config.num_classes(config.data), config)


def create_method(config):
  """(method, frozen) for `config`, the backbone (`config.backbone`) headless,
  held in `config.backbone_dtype` (an older export's: float32)."""
  vit, backbone = checkpoint.load(
      config.backbone.source, image_size=config.data.image_size,
      collection=config.backbone.collection,
      cache_dir=config.backbone.cache_dir, headless=True,
      posemb_resize=config.backbone.get('posemb_resize'),
      storage_dtype=models_vit.DTYPES[config.get('backbone_dtype', 'float32')],
      dtype=models_vit.DTYPES[config.dtype])
  return from_config(config, vit), {'backbone': backbone}
