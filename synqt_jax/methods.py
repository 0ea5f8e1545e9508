"""Tuning methods behind one functional interface, so one trainer serves them all.

A method splits the parameters into `trainable` (optimised, checkpointed,
exported) and `frozen` (the pre-trained backbone: never differentiated, never in
the optimizer) and computes logits from both:

  method.init(rng, frozen, images) -> trainable
  method.apply(trainable, frozen, images, train=False, rngs=None) -> logits

`frozen` is `{'backbone': <the checkpoint's tree>}` for every method; `rngs` maps
Flax RNG streams ('dropout', 'drop_path') to keys in training.
"""
import dataclasses
import functools
from typing import Any

import jax

from synqt_jax import baselines
from synqt_jax import image_path_memory
from synqt_jax import input_pipeline
from synqt_jax import models_vit
from synqt_jax import synqt


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
    trainable = jax.jit(functools.partial(
        self.model.init, method=synqt.SynQTModel.init_trainable))(rng)['params']
    trainable = dict(trainable)
    encoder_norm = frozen['backbone']['Transformer']['encoder_norm']
    trainable['synqt'] = {**trainable['synqt'], 'head_norm': dict(encoder_norm)}
    return trainable

  def apply(self, trainable, frozen, images, train=False, rngs=None):
    if train and self.config.image_path_memory == 'recompute':
      return image_path_memory.training_logits(self, trainable, frozen, images,
                                               rngs)
    return self.model.apply({'params': {**trainable, **frozen}}, images,
                            train=train, rngs=rngs)

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


METHODS = ('synqt', 'linear', 'full', 'lora')


def create(name, vit: models_vit.ViTConfig, num_classes, synqt_options=None,
           lora_rank=8):
  """The method called `name` ('synqt', 'linear', 'full' or 'lora') for a ViT."""
  if name == 'synqt':
    return SynQT(vit, synqt.SynQTConfig(num_classes=num_classes,
                                        **(synqt_options or {})))
  if name == 'linear':
    return baselines.LinearProbe(vit, num_classes)
  if name == 'full':
    return baselines.FullFineTune(vit, num_classes)
  if name == 'lora':
    return baselines.LoRA(vit, num_classes, rank=lora_rank, alpha=float(lora_rank))
  raise ValueError(f'method={name!r}; expected one of {METHODS}.')


def from_config(config, vit: models_vit.ViTConfig):
  """The method `config.method` names, for the task `config.data.task`."""
  return create(config.method, vit, input_pipeline.num_classes(config.data),
                synqt_options=config.synqt.to_dict())
