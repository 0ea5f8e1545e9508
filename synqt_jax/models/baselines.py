"""Baselines behind `methods`' interface: linear probe, full fine-tuning, LoRA.

All three run the pre-trained ViT's classifier path (class token after
`encoder_norm`, or the mean of all tokens for a 'gap' ViT; the backbone is
headless, so no `pre_logits`) into a new task head,
and differ only in what trains:

  LinearProbe   the head; the backbone is frozen.
  FullFineTune  the whole backbone and the head; `trainable` holds the backbone.
  LoRA          rank-r updates of every block's query and value kernels, and the head.

As in `methods`, `frozen` is `{'backbone': <the checkpoint's tree>}`; `rngs` has a
'drop_path' key in training (a 'dropout' key is accepted and unused).
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from synqt_jax.models import synqt
from synqt_jax.models import vit as models_vit

# The attention projections LoRA adapts, as the LoRA paper's ViT/GPT experiments.
LORA_TARGETS = ('query', 'value')


def _pooled_features(vit, images, drop_rate, rng):
  """A bound `VisionTransformer` -> its classifier's input after `encoder_norm`, (B, D).

  Stochastic depth on block i uses rate `i * drop_rate / (L - 1)`, as timm.
  """
  x = vit.Transformer.blocks(vit.tokens(images), drop_rate, rng)
  return vit.pool(vit.Transformer.encoder_norm(x))


@dataclasses.dataclass(frozen=True)
class _ViTClassifier:
  """The ViT classifier path with a new head: what the baselines share."""
  vit: models_vit.ViTConfig
  num_classes: int

  @property
  def head(self):
    return synqt.linear(self.num_classes, self.vit.hidden_size, None, self.vit.dtype)

  def init_head(self, rng):
    features = jnp.zeros((1, self.vit.hidden_size), self.vit.dtype)
    return self.head.init(rng, features)['params']

  def features(self, backbone, images, drop_rate=0.0, rngs=None):
    """The pooled tokens of `images` run through `backbone` (a checkpoint tree)."""
    rng = rngs['drop_path'] if drop_rate > 0 else None
    return models_vit.VisionTransformer(self.vit).apply(
        {'params': backbone}, images, drop_rate, rng, method=_pooled_features)

  def logits(self, head, backbone, images, drop_rate=0.0, rngs=None):
    """Head on the pooled tokens of `images` run through `backbone`."""
    return self.head.apply({'params': head},
                           self.features(backbone, images, drop_rate, rngs))


@dataclasses.dataclass(frozen=True)
class LinearProbe(_ViTClassifier):
  """`trainable` = {'head'}; the backbone runs under `stop_gradient`.

  Nothing on its backbone path is stochastic, so a feature cache of the pooled
  features (`image_kv`, `apply_kv`) trains exactly as online does.
  """
  cache_note = "the same steps as online (the linear probe's features have nothing stochastic)"

  @property
  def cache_row_shape(self):
    return (self.vit.hidden_size,)

  def init(self, rng, frozen, images):
    del frozen, images  # The head's shape follows from the configs.
    return {'head': self.init_head(rng)}

  def apply(self, trainable, frozen, images, train=False, rngs=None):
    del train, rngs  # Nothing stochastic.
    backbone = jax.lax.stop_gradient(frozen['backbone'])
    return self.logits(trainable['head'], backbone, images)

  def image_kv(self, frozen, images):
    """The pooled features (B, D) the head reads: what a feature cache stores."""
    return self.features(frozen['backbone'], images)

  def apply_kv(self, trainable, frozen, features, train=False, rngs=None):
    del frozen, train, rngs
    features = synqt.from_kv_bits(features)  # A bfloat16 cache's rows come as bits.
    return self.head.apply({'params': trainable['head']}, features.astype(self.vit.dtype))


@dataclasses.dataclass(frozen=True)
class FullFineTune(_ViTClassifier):
  """`trainable` = {'backbone', 'head'}: everything trains, with stochastic depth.

  `init` copies the pre-trained `frozen['backbone']` into `trainable`; `apply`
  ignores `frozen`, so callers can pass `{}` and hold the backbone only once.
  """
  trains_backbone: ClassVar[bool] = True  # Its weights stay float32 (backbone_dtype).
  drop_path: float = 0.1

  def init(self, rng, frozen, images):
    del images
    # A copy, not an alias: donating `trainable` to a train step must leave the
    # caller's pre-trained tree intact.
    backbone = jax.tree.map(jnp.array, frozen['backbone'])
    return {'backbone': backbone, 'head': self.init_head(rng)}

  def apply(self, trainable, frozen, images, train=False, rngs=None):
    del frozen  # The backbone is trainable.
    return self.logits(trainable['head'], trainable['backbone'], images,
                       self.drop_path if train else 0.0, rngs)


def merge_lora(backbone, lora, scale):
  """A copy of `backbone` whose adapted kernels are W + scale * a @ b.

  `lora` is `{'encoderblock_i': {'query': {'a': (D, r), 'b': (r, H, D/H)}, ...}}`;
  `a @ b` is (D, H, D/H), the checkpoint's query/key/value kernel layout. The
  backbone holds the blocks stacked (`layouts.nest`), so the updates are
  stacked too (a copy of the small `a`, `b` only).
  """
  blocks = backbone['Transformer']['encoderblock']
  attention = dict(blocks['MultiHeadDotProductAttention_1'])
  for name in LORA_TARGETS:
    a, b = (jnp.stack([lora[f'encoderblock_{i}'][name][factor]
                       for i in range(len(lora))]) for factor in ('a', 'b'))
    kernel = attention[name]['kernel']
    attention[name] = {**attention[name],
                       'kernel': kernel + scale * jnp.einsum('ldr,lrhk->ldhk', a, b)}
  blocks = {**blocks, 'MultiHeadDotProductAttention_1': attention}
  return {**backbone, 'Transformer': {**backbone['Transformer'], 'encoderblock': blocks}}


@dataclasses.dataclass(frozen=True)
class LoRA(_ViTClassifier):
  """`trainable` = {'lora', 'head'}: low-rank query/value updates and a new head.

  The updates are merged into a copy of the frozen kernels at every `apply` (the
  standard functional form); `b` starts at zero, so the initial model is exactly
  the pre-trained backbone with a new head.
  """
  rank: int = 8
  alpha: float = 8.0
  drop_path: float = 0.0

  def init(self, rng, frozen, images):
    del frozen, images
    vit, rank = self.vit, self.rank
    # `a` as PEFT's lora_A, an nn.Linear(D, r): kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(D)).
    a_init = synqt.torch_linear_init(vit.hidden_size)['kernel_init']
    head_rng, lora_rng = jax.random.split(rng)
    keys = jax.random.split(lora_rng, (vit.num_layers, len(LORA_TARGETS)))
    lora = {
        f'encoderblock_{i}': {
            name: {'a': a_init(keys[i, j], (vit.hidden_size, rank)),
                   'b': jnp.zeros((rank, vit.num_heads, vit.head_dim), jnp.float32)}
            for j, name in enumerate(LORA_TARGETS)}
        for i in range(vit.num_layers)}
    return {'lora': lora, 'head': self.init_head(head_rng)}

  def apply(self, trainable, frozen, images, train=False, rngs=None):
    backbone = merge_lora(jax.lax.stop_gradient(frozen['backbone']),
                          trainable['lora'], self.alpha / self.rank)
    return self.logits(trainable['head'], backbone, images,
                       self.drop_path if train else 0.0, rngs)
