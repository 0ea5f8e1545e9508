"""A Flax Vision Transformer whose parameter tree is Google's `.npz` tree, blocks stacked.

Every submodule is named after the checkpoint key it owns (`embedding`, `cls`,
`Transformer/encoderblock_3/MultiHeadDotProductAttention_1/query`, ...), so loading
a checkpoint is: read the file, split the keys on '/', `apply`; only the L blocks
are held stacked on a leading axis (`Transformer/encoderblock/...`, big_vision's
`scan` layout: `layouts.nest` stacks them), so that one block is compiled and
run in a scan, not L unrolled copies. The blocks expose the pieces SynQT's query
path needs (`image_kv`, `attend`, `mlp`), so the frozen image path and the
trainable query path share one set of weights.

The families of vit_jax's `VisionTransformer` are covered: a class token or
global average pooling (`classifier`), and the R50+ViT hybrids' ResNet stem
(`resnet`, see models_resnet.py) under the patch embedding.
"""
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synqt_jax.models import resnet as models_resnet

# The backbone's LayerNorm epsilon: timm's and Google's ViT both use 1e-6.
BACKBONE_LN_EPS = 1e-6
# What the pre-trained classifier reads: the class token, or the mean of all tokens.
CLASSIFIERS = ('token', 'gap')
# The dtypes a config names, by name: activations (`dtype`), the frozen
# backbone's storage (`backbone_dtype`), SynQT's K/V (`synqt.kv_dtype`) and a
# feature cache's rows (`train.cache_dtype`); bfloat16 halves their memory.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT, as read from a checkpoint (see `checkpoint.vit_config`)."""
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  representation_size: Optional[int] = None  # `pre_logits` width, None if absent.
  num_classes: Optional[int] = None  # `head` outputs, None for a headless backbone.
  approximate_gelu: bool = False  # Exact (erf) GELU, as the reference computed.
  dtype: Any = jnp.float32  # Activation dtype: parameters compute in it, as stored.
  classifier: str = 'token'  # 'gap': no class token, tokens are the patches only.
  resnet: Optional[models_resnet.ResNetConfig] = None  # A hybrid's ResNet stem.

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier={self.classifier!r}; expected one of {CLASSIFIERS}.')

  @property
  def head_dim(self):
    return self.hidden_size // self.num_heads

  @property
  def patch_stride(self):
    """Input pixels per token side: the patch, times the ResNet stem's stride."""
    return self.patch_size * (self.resnet.stride if self.resnet else 1)

  @property
  def num_prefix_tokens(self):
    """Tokens before the patch grid: the class token, or none for 'gap'."""
    return 1 if self.classifier == 'token' else 0

  @property
  def num_tokens(self):
    """Image tokens: the prefix tokens + (S / patch_stride)^2."""
    return self.num_prefix_tokens + (self.image_size // self.patch_stride) ** 2


@jax.custom_jvp
def softmax(x):
  """Softmax over the last axis, differentiated as y * (dx - sum(y * dx)) (PyTorch's).

  Autodiff through exp/sum/divide (`jax.nn.softmax` by default) leaves float32
  round-off of order 1e-7 * |g| in the gradient of a saturated row; SynQT's query
  self-attention saturates at initialisation, where the true gradient is ~1e-14.
  """
  unnormalized = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
  return unnormalized / unnormalized.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = softmax(x)
  return y, y * (x_dot - (y * x_dot).sum(-1, keepdims=True))


def drop_path(x, survival, rng, rows=None):
  """Stochastic depth: zero whole samples with probability 1 - `survival`, rescale the rest.

  `rng` None: no drop. `rows=(start, batch)`: `x` is the rows from `start` (may
  be traced) of a batch of `batch`; they get that batch's draws, so a batch
  computed piece by piece is dropped as a whole.
  """
  if rng is None:
    return x
  start, batch = rows or (0, x.shape[0])
  keep = jax.lax.dynamic_slice_in_dim(
      jax.random.bernoulli(rng, survival, (batch,) + (1,) * (x.ndim - 1)),
      start, x.shape[0])
  return jnp.where(keep, x / survival.astype(x.dtype), jnp.zeros_like(x))


class MlpBlock(nn.Module):
  """The block's feed-forward layer: Dense_0, GELU, Dense_1."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = nn.Dense(c.mlp_dim, dtype=c.dtype, name='Dense_0')(x)
    x = nn.gelu(x, approximate=c.approximate_gelu)
    return nn.Dense(c.hidden_size, dtype=c.dtype, name='Dense_1')(x)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention split into K/V of a sequence and queries attending to it.

  Kernels keep the checkpoint's layout: query/key/value (D, H, D/H), out (H, D/H, D).
  """
  config: ViTConfig

  def setup(self):
    c = self.config
    heads = (c.num_heads, c.head_dim)
    self.query = nn.DenseGeneral(heads, dtype=c.dtype)
    self.key = nn.DenseGeneral(heads, dtype=c.dtype)
    self.value = nn.DenseGeneral(heads, dtype=c.dtype)
    self.out = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=c.dtype)

  def kv(self, x):
    """Keys and values of tokens `x` (B, N, D) -> two (B, N, H, D/H)."""
    return self.key(x), self.value(x)

  def attention_weights(self, x, k):
    """Softmax weights (B, H, T, N) of tokens `x` (B, T, D) over keys `k`."""
    q = self.query(x) * (self.config.head_dim ** -0.5)
    logits = jnp.einsum('bthd,bnhd->bhtn', q, k)
    return softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))

  def attend(self, x, k, v):
    """Tokens `x` (B, T, D) attend to `k`, `v`; returns the output projection."""
    weights = self.attention_weights(x, k).astype(v.dtype)
    return self.out(jnp.einsum('bhtn,bnhd->bthd', weights, v))

  def __call__(self, x):
    return self.attend(x, *self.kv(x))


class Encoder1DBlock(nn.Module):
  """Pre-norm Transformer block: x + Attn(LN_0 x), then x + MLP(LN_2 x)."""
  config: ViTConfig

  def setup(self):
    c = self.config
    self.LayerNorm_0 = nn.LayerNorm(epsilon=BACKBONE_LN_EPS, dtype=c.dtype)
    self.MultiHeadDotProductAttention_1 = MultiHeadDotProductAttention(c)
    self.LayerNorm_2 = nn.LayerNorm(epsilon=BACKBONE_LN_EPS, dtype=c.dtype)
    self.MlpBlock_3 = MlpBlock(c)

  def image_kv(self, x):
    """The keys and values this block's attention reads from image tokens `x`."""
    return self.MultiHeadDotProductAttention_1.kv(self.LayerNorm_0(x))

  def attend(self, x, k, v):
    """Attention output for tokens `x` reading `k`, `v` (before the residual)."""
    return self.MultiHeadDotProductAttention_1.attend(self.LayerNorm_0(x), k, v)

  def attention_weights(self, x, k):
    """Where tokens `x` look among the image tokens (for visualisation)."""
    return self.MultiHeadDotProductAttention_1.attention_weights(
        self.LayerNorm_0(x), k)

  def mlp(self, x):
    """MLP output for tokens `x` (before the residual)."""
    return self.MlpBlock_3(self.LayerNorm_2(x))

  def advance(self, x, k, v, drop, rows=None):
    """The block's output tokens from its input `x` and their K/V `k`, `v`.

    `drop`: the block's stochastic depth, see `drop_path_inputs`; `rows`: see
    `drop_path`.
    """
    survival, keys = drop
    x = x + drop_path(self.attend(x, k, v), survival, branch_key(keys, 0), rows)
    return x + drop_path(self.mlp(x), survival, branch_key(keys, 1), rows)

  def __call__(self, x, drop):
    """The ordinary block, as a step of a scan over the blocks: (output, None)."""
    return self.advance(x, *self.image_kv(x), drop), None


def branch_key(keys, branch):
  """A block's stochastic-depth key of `branch` (0: attention, 1: MLP), or None."""
  return None if keys is None else keys[branch]


def block_method(config, params, method):
  """`Encoder1DBlock` method `method` on one block's `params`, a pure function.

  What a `jax.lax.scan` over the stacked blocks calls on its slice of them.
  """
  return functools.partial(Encoder1DBlock(config, parent=None).apply,
                           {'params': params}, method=method)


class AddPositionEmbs(nn.Module):
  """`posembed_input`: a learned (1, N, D) position embedding."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (1, c.num_tokens, c.hidden_size))
    return x + pos.astype(x.dtype)


class Encoder(nn.Module):
  """`Transformer`: position embedding, the blocks (scanned), the final norm."""
  config: ViTConfig

  def setup(self):
    c = self.config
    self.posembed_input = AddPositionEmbs(c)
    self.encoderblock = nn.scan(
        Encoder1DBlock, variable_axes={'params': 0, 'intermediates': 0},
        split_rngs={'params': True}, length=c.num_layers)(c)
    self.encoder_norm = nn.LayerNorm(epsilon=BACKBONE_LN_EPS, dtype=c.dtype)

  def blocks(self, x, drop_rate=0.0, rng=None):
    """Tokens `x` through every block, with stochastic depth (`drop_path_inputs`)."""
    return self.encoderblock(
        x, drop_path_inputs(self.config.num_layers, drop_rate, rng))[0]

  def __call__(self, x):
    """Embedded tokens (position embedding added, see `VisionTransformer.tokens`)."""
    return self.encoder_norm(self.blocks(x))


class VisionTransformer(nn.Module):
  """ViT with the checkpoint's names; `__call__` is the original classifier."""
  config: ViTConfig

  def setup(self):
    c = self.config
    if c.resnet is not None:
      self.conv_root = models_resnet.StdConv(c.resnet.width, 7, 2, c.dtype)
      self.gn_root = models_resnet.group_norm(c.dtype)
      for i, stage in enumerate(models_resnet.stages(c.resnet, c.dtype)):
        setattr(self, models_resnet.stage_name(i), stage)  # The file's names.
    self.embedding = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                             strides=(c.patch_size, c.patch_size),
                             padding='VALID', dtype=c.dtype)
    if c.classifier == 'token':
      self.cls = self.param('cls', nn.initializers.zeros, (1, 1, c.hidden_size))
    self.Transformer = Encoder(c)
    if c.representation_size is not None:
      self.pre_logits = nn.Dense(c.representation_size, dtype=c.dtype)
    if c.num_classes is not None:
      self.head = nn.Dense(c.num_classes, dtype=c.dtype,
                           kernel_init=nn.initializers.zeros)

  @property
  def block_params(self):
    """Every block's parameters, stacked on axis 0 (what the scans slice)."""
    return self.variables['params']['Transformer']['encoderblock']

  def stem(self, images):
    """What the patch embedding reads: the images, or a hybrid's ResNet features."""
    x = images.astype(self.config.dtype)
    if self.config.resnet is None:
      return x
    x = models_resnet.root(self.conv_root, self.gn_root, x)
    for i in range(len(self.config.resnet.num_layers)):
      x = getattr(self, models_resnet.stage_name(i))(x)
    return x

  def tokens(self, images):
    """Images (B, S, S, 3) -> patch tokens (after any class token), position embedded."""
    x = self.embedding(self.stem(images))
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    if self.config.classifier == 'token':
      cls = jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    return self.Transformer.posembed_input(x)

  def pool(self, encoded):
    """The classifier's input from encoded tokens (B, N, D): class token or mean."""
    if self.config.classifier == 'token':
      return encoded[:, 0]
    return encoded.mean(axis=1)

  def representation(self, x):
    """`pre_logits` (Dense + tanh) where the checkpoint has one, else identity."""
    if self.config.representation_size is None:
      return x
    return jnp.tanh(self.pre_logits(x))

  def image_path(self, images, drop_rate=0.0, rng=None, store=None, piece=None):
    """The frozen image path: per-block (K, V) of the image tokens, no gradient.

    Stochastic depth on block i uses rate `i * drop_rate / (L - 1)`, as timm.
    Returns (L, 2, B, N, H, D/H): block i's keys and values, each block's
    `store(kv)` as it makes them (e.g. rounded; None: as computed). `piece`:
    the images go through every block at most this many at a time (the
    largest divisor of the batch up to it), each piece's K/V written into
    their place in the output, so that only one piece's attention weights
    and MLP activations exist at once; None: the whole batch.
    """
    c = self.config
    batch = images.shape[0]
    size = batch if piece is None else largest_divisor(batch, piece)
    drop = drop_path_inputs(c.num_layers, drop_rate, rng)

    def through_blocks(x, start):
      """The K/V of tokens `x`, rows `start`... of the batch, in every block."""
      def step(x, inputs):
        params, index, drop = inputs
        block = functools.partial(block_method, c, params)
        k, v = jax.lax.stop_gradient(block('image_kv')(x))
        x = jax.lax.cond(  # The last block's output is never read.
            index + 1 < c.num_layers,
            lambda: jax.lax.stop_gradient(
                block('advance')(x, k, v, drop, (start, batch))),
            lambda: x)
        kv = jnp.stack([k, v])
        return x, kv if store is None else store(kv)
      return jax.lax.scan(step, x, (self.block_params,
                                    jnp.arange(c.num_layers), drop))[1]

    x = jax.lax.stop_gradient(self.tokens(images))
    if size == batch:
      return through_blocks(x, 0)

    def piece_kv(start):
      return through_blocks(jax.lax.dynamic_slice_in_dim(x, start, size), start)

    def write_piece(i, kv):
      return jax.lax.dynamic_update_slice_in_dim(kv, piece_kv(i * size), i * size,
                                                 axis=2)

    shape = jax.eval_shape(piece_kv, 0)
    return jax.lax.fori_loop(0, batch // size, write_piece,
                             jnp.zeros(shape.shape[:2] + (batch,) + shape.shape[3:],
                                       shape.dtype))

  def __call__(self, images):
    """The pre-trained classifier: class token (or token mean) -> pre_logits -> head."""
    x = self.representation(self.pool(self.Transformer(self.tokens(images))))
    return self.head(x) if self.config.num_classes is not None else x


def largest_divisor(n, at_most):
  """The largest divisor of `n` up to `at_most` (at least 1)."""
  return max(d for d in range(1, min(at_most, n) + 1) if n % d == 0)


def drop_path_inputs(num_layers, rate, rng):
  """Every block's stochastic depth, to scan over: (survival (L,), keys (L, 2)).

  Block i keeps a sample with probability 1 - `block_drop_rate(i, L, rate)`
  (computed in float64, then rounded once); its two branches draw with
  `split(fold_in(rng, i))`. Keys None (no drop) without `rng`.
  """
  survival = np.array([1.0 - block_drop_rate(i, num_layers, rate)
                       for i in range(num_layers)], np.float32)
  keys = None if rng is None else jax.vmap(  # One PRNG computation to compile, not L.
      lambda i: jax.random.split(jax.random.fold_in(rng, i)))(jnp.arange(num_layers))
  return jnp.asarray(survival), keys


def block_drop_rate(i, num_layers, rate):
  """timm's linearly increasing stochastic depth: block i of L gets i * rate / (L-1)."""
  return 0.0 if num_layers == 1 else i * rate / (num_layers - 1)
