"""SynQT: a trainable query-synthesis path beside a frozen ViT (docs/synqt.md).

The image path (`VisionTransformer.image_path`) runs under `stop_gradient` and hands
out each block's keys/values. The query path makes T queries per block from
learnable tokens, lets them read that block's K/V with the block's own frozen
attention and MLP ("query-only" attention), and a head combines the 1 + 3L per-layer
features into logits. Only `synqt` and `head` train.

Parameter names follow the reference implementation (`qsm_block_3/attn/k_proj/fc1`
for `synqt.qsm_block.3.attn.k_proj.mlp.fc1`) so `reference.py` converts by rule.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synqt_jax.models import vit as models_vit

# Every LayerNorm of the SynQT module uses PyTorch's default epsilon.
SYNQT_LN_EPS = 1e-5
IMAGE_PATH_MEMORY = ('keep_kv', 'recompute')
# Images the image path runs at once on a CPU (SynQTConfig.image_path_batch).
CPU_IMAGE_PATH_BATCH = 1


def kv_bits(kv):
  """bfloat16 K/V as their uint16 bits (others as they are), to cross a scan.

  XLA:CPU converts a bfloat16 array that a loop reads slice by slice to one
  float32 copy of all of it before the loop; through a bitcast it cannot, so
  bfloat16 K/V travel as bits and are read block by block (`from_kv_bits`).
  """
  return jax.lax.bitcast_convert_type(kv, jnp.uint16) if kv.dtype == jnp.bfloat16 else kv


def from_kv_bits(kv):
  """The inverse of `kv_bits`."""
  return jax.lax.bitcast_convert_type(kv, jnp.bfloat16) if kv.dtype == jnp.uint16 else kv


@dataclasses.dataclass(frozen=True)
class SynQTConfig:
  """The reference's configurable values (defaults: its VTAB-1k recipe)."""
  num_classes: int
  token_nums: int = 4
  attn_scale: float = 1.0
  ffn_scale: float = 0.1
  feat_scale: float = 0.1
  dropout: float = 0.1  # Adapters, QSM attention, queries, combine block.
  drop_path: float = 0.1  # Backbone stochastic depth (image and query paths).
  head_drop_path: float = 0.3  # DropPath on the head's features j >= 1.
  image_drop_path: bool = True  # False when training from a feature cache.
  # What online training keeps of the image path for the backward pass: every
  # block's K/V ('keep_kv'), or only the input tokens, re-running both paths
  # at most an eighth of the batch at a time in the backward pass ('recompute',
  # see image_path_memory.py: ~1/6 of the memory, twice the image-path compute).
  image_path_memory: str = 'keep_kv'
  # How keep_kv holds the K/V between the image path and the query path
  # (models_vit.DTYPES): 'float32' as computed, or rounded to 'bfloat16' (half
  # the memory the backward pass keeps); the query path computes in the ViT's
  # dtype.
  kv_dtype: str = 'float32'
  # How many images the image path runs at once (0: CPU_IMAGE_PATH_BATCH on a
  # CPU, the whole batch elsewhere); see `image_path_images`.
  image_path_batch: int = 0

  def image_path_images(self):
    """`models_vit.VisionTransformer.image_path`'s `piece`.

    On a CPU the blocks run faster on one image at a time, and only one
    image's attention weights and MLP activations exist at once (ViT-B/16
    keep_kv at batch 64: ~1.4x the images per second and 0.76x XLA's
    temporaries of the whole batch at once); each image's K/V are then the
    same whatever the batch (a feature cache's build batches, online
    training's). A GPU or TPU wants the whole batch at once.
    """
    if self.image_path_batch:
      return self.image_path_batch
    return CPU_IMAGE_PATH_BATCH if jax.default_backend() == 'cpu' else None

  def __post_init__(self):
    if self.image_path_memory not in IMAGE_PATH_MEMORY:
      raise ValueError(f'image_path_memory={self.image_path_memory!r}; '
                       f'expected one of {IMAGE_PATH_MEMORY}.')
    if not (isinstance(self.image_path_batch, int) and self.image_path_batch >= 0):
      raise ValueError(f'image_path_batch={self.image_path_batch!r}; expected '
                       'an int >= 0 (0: automatic).')
    if self.kv_dtype not in models_vit.DTYPES:
      raise ValueError(f'kv_dtype={self.kv_dtype!r}; expected one of '
                       f'{tuple(models_vit.DTYPES)}.')


def torch_linear_init(fan_in):
  """PyTorch's nn.Linear initialisers: U(+-1/sqrt(fan_in)) for kernel and bias."""
  bound = fan_in ** -0.5
  uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)
  return dict(kernel_init=uniform, bias_init=uniform)


def linear(features, fan_in, name, dtype):
  return nn.Dense(features, name=name, dtype=dtype, **torch_linear_init(fan_in))


def symmetric_uniform(key, shape, dtype=jnp.float32):
  """U(-1, 1), the reference's initialisation of the learnable queries."""
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


def layer_norm(name, dtype):
  return nn.LayerNorm(epsilon=SYNQT_LN_EPS, name=name, dtype=dtype)


def exact_gelu(x):
  return nn.gelu(x, approximate=False)


def after(value, tree):
  """`value`, made to wait for `tree` (a data dependency that no compiler drops).

  Adds 0 * (a float read from `tree`): compilers keep 0 * y for floating-point
  y, as it is NaN for infinite y. Gradients do not flow into `tree`.
  """
  leaves = [jnp.ravel(leaf)[0].astype(value.dtype)
            for leaf in jax.tree.leaves(jax.lax.stop_gradient(tree))]
  return value + 0 * sum(leaves)


class Adapter(nn.Module):
  """z + Drop(fc2(Drop(GELU(fc1(z))))), a bottleneck of width `hidden`."""
  hidden: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, deterministic):
    width = z.shape[-1]
    drop = nn.Dropout(self.dropout, deterministic=deterministic)
    h = drop(exact_gelu(linear(self.hidden, width, 'fc1', self.dtype)(z)))
    return z + drop(linear(width, self.hidden, 'fc2', self.dtype)(h))


class QSMAttention(nn.Module):
  """Single-head attention among the T queries, with adapter projections."""
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, deterministic):
    proj = functools.partial(Adapter, 8, 0.0, self.dtype)
    a = layer_norm('q_norm', self.dtype)(z)
    b = layer_norm('kv_norm', self.dtype)(z)
    q = proj(name='q_proj')(a, deterministic)
    k = proj(name='k_proj')(b, deterministic)
    v = proj(name='v_proj')(b, deterministic)
    drop = nn.Dropout(self.dropout, deterministic=deterministic)
    attn = models_vit.softmax(q @ jnp.swapaxes(k, -1, -2) * z.shape[-1] ** -0.5)
    return drop(proj(name='proj')(drop(attn) @ v, deterministic))


class QSMBlock(nn.Module):
  """Query-synthesis block: z + α·Attn(LN1 z), then z + β·Adapter(LN2 z)."""
  config: SynQTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, deterministic):
    c = self.config
    alpha = self.param('attn_scale', nn.initializers.constant(c.attn_scale), (1,))
    beta = self.param('ffn_scale', nn.initializers.constant(c.ffn_scale), (1,))
    h = layer_norm('norm1', self.dtype)(z)
    z = z + QSMAttention(c.dropout, self.dtype, name='attn')(h, deterministic) * alpha
    h = layer_norm('norm2', self.dtype)(z)
    return z + Adapter(48, c.dropout, self.dtype, name='mlp')(h, deterministic) * beta


def prompt_adapter(config, dtype, **kwargs):
  """`prompt_ffn_i`: the adapter a layer's queries go through first."""
  return Adapter(48, config.dropout, dtype, **kwargs)


class QuerySynthesis(nn.Module):
  """`synqt`: the learnable queries, their synthesis, and the feature combiner.

  Layer i's modules are created under the reference's names (`prompt_ffn_3`,
  `qsm_block_3`, `init_layers`) and held stacked (`prompt_ffn`, `qsm_block`:
  `layouts.nest`), which the query path scans over.
  """
  config: SynQTConfig
  num_layers: int
  width: int
  dtype: Any = jnp.float32

  def setup(self):
    c, L, D = self.config, self.num_layers, self.width
    self.q = self.param('q', symmetric_uniform, (L, c.token_nums, D))
    self.feat_scale = self.param(
        'feat_scale', nn.initializers.constant(c.feat_scale), (1,))
    self.prompt_ffn = [prompt_adapter(c, self.dtype) for _ in range(L)]
    self.qsm_block = [QSMBlock(c, self.dtype) for _ in range(L)]
    self.out_norm = layer_norm(None, self.dtype)
    self.mlp = Adapter(48, c.dropout, self.dtype)
    self.combine = linear(3 * L, D, None, self.dtype)
    self.combine_drop = nn.Dropout(c.dropout)
    self.head_norm = layer_norm(None, self.dtype)

  def init_layers(self):
    """Creates every layer's parameters (the query path only reads them)."""
    z = jnp.zeros((1, self.config.token_nums, self.width), self.dtype)
    for ffn, qsm in zip(self.prompt_ffn, self.qsm_block):
      qsm(ffn(z, True), True)

  def layer_params(self):
    """(q, prompt_ffn, qsm_block): every layer's, stacked on axis 0, to scan
    over (`methods.SynQT.init` stacks what `init_layers` created)."""
    params = self.variables['params']
    return self.q, params['prompt_ffn'], params['qsm_block']

  def layer_queries(self, params, previous, deterministic, rng):
    """Layer i's T queries (B, T, D), a pure function of its slice `params` of
    `layer_params` and of `previous`, f_{i-1} (B, 1, D; zeros for layer 0).

    `rng`: the layer's dropout key (None when `deterministic`).
    """
    q, ffn, qsm = params
    keys = [None] * 3 if rng is None else [{'dropout': k}
                                          for k in jax.random.split(rng, 3)]
    p = jnp.broadcast_to(q.astype(self.dtype), (previous.shape[0],) + q.shape)
    p = p + self.feat_scale.astype(self.dtype) * previous
    p = prompt_adapter(self.config, self.dtype, parent=None).apply(
        {'params': ffn}, p, deterministic, rngs=keys[0])
    p = QSMBlock(self.config, self.dtype, parent=None).apply(
        {'params': qsm}, p, deterministic, rngs=keys[1])
    return nn.Dropout(self.config.dropout, parent=None).apply(
        {}, p, deterministic, rngs=keys[2])

  def combine_features(self, features, deterministic):
    """(B, 1+3L, D) features -> (B, D): adapter, tanh-gated weights, mean, head_norm."""
    c = self.config
    g = features + self.mlp(self.out_norm(features), deterministic)
    if not deterministic and c.head_drop_path > 0:
      keep = jax.random.bernoulli(self.make_rng('drop_path'), 1 - c.head_drop_path,
                                  g.shape[:2] + (1,))
      keep = keep.at[:, 0].set(True)  # g_0 is never dropped.
      scale = jnp.where(jnp.arange(g.shape[1])[None, :, None] == 0,
                        1.0, 1.0 / (1 - c.head_drop_path))
      g = jnp.where(keep, g * scale.astype(g.dtype), 0)
    w = exact_gelu(self.combine(g[:, 0]))
    w = jnp.tanh(self.combine_drop(w, deterministic))
    weights = jnp.concatenate([jnp.ones_like(w[:, :1]), w], axis=1)
    return self.head_norm(jnp.mean(weights[..., None] * g, axis=1))


class SynQTModel(nn.Module):
  """Frozen `backbone` (the checkpoint's tree), trainable `synqt` and `head`.

  The backbone is headless (`checkpoint.load(..., headless=True)`): as in the
  reference, the pre-trained `pre_logits` and `head` take no part.

  `__call__(images)` = `logits_from_kv(image_kv(images))`; the split lets a
  feature cache feed stored K/V to the query path. Both paths are one
  `jax.lax.scan` over the layers (one block compiled, not L).

  Block outputs are (f, a, m), each (B, L, D): per layer, the mean over the
  queries of the block's output, attention branch and MLP branch.
  """
  vit: models_vit.ViTConfig
  config: SynQTConfig

  def setup(self):
    vit, c = self.vit, self.config
    self.backbone = models_vit.VisionTransformer(vit)
    self.synqt = QuerySynthesis(c, vit.num_layers, vit.hidden_size, vit.dtype)
    self.head = linear(c.num_classes, vit.hidden_size, None, vit.dtype)

  def init_trainable(self):
    """Touches every trainable module once, without the backbone (cheap `init`)."""
    self.synqt.init_layers()
    features = jnp.zeros((1, 1 + 3 * self.vit.num_layers, self.vit.hidden_size),
                         self.vit.dtype)
    return self.head(self.synqt.combine_features(features, True))

  def image_kv(self, images, train=False):
    """Per-block keys/values of the image tokens: (B, L, 2, N, H, D/H), no gradient.

    In `config.kv_dtype`'s storage.
    """
    return jnp.moveaxis(from_kv_bits(self._image_path(images, train)), 2, 0)

  def _image_path(self, images, train):
    """`image_kv` in the image path's own layout, (L, 2, B, N, H, D/H), as
    `kv_bits` (bfloat16 storage: uint16)."""
    rate = self._image_drop_rate(train)
    rng = self.make_rng('drop_path') if rate > 0 else None
    dtype = models_vit.DTYPES[self.config.kv_dtype]
    as_computed = dtype == jnp.float32  # In the ViT's dtype, never widened.
    return self.backbone.image_path(
        images, rate, rng, None if as_computed else lambda kv: kv_bits(kv.astype(dtype)),
        self.config.image_path_images())

  def _split(self, kv, i, layer_axis):
    """Block i's (K, V), in the ViT's dtype, read where they lie in the stored
    K/V (layers on `layer_axis`: 0 as the image path makes them, 1 as
    `image_kv`). Indexed inside the scan, not scanned over: a scan over them
    would first copy all the K/V (layer-major, or as the backward pass's)."""
    kv = jax.lax.dynamic_index_in_dim(kv, i, layer_axis, keepdims=False)
    kv = from_kv_bits(kv).astype(self.vit.dtype)
    return (kv[:, 0], kv[:, 1]) if layer_axis else (kv[0], kv[1])

  def query_path(self, kv, train=False, with_attention=False):
    """Runs the queries through every frozen block; returns the (B, 1+3L, D) features.

    `kv`: as `image_kv`. With `with_attention`, also the queries' attention over
    the image tokens, (B, L, H, T, N), for visualisation.
    """
    return self._query_path(kv, 1, train, with_attention)

  def _query_path(self, kv, layer_axis, train, with_attention=False):
    """`query_path` of K/V `kv` with the layers on `layer_axis` (`_split`)."""

    def step(layer, block, query_drop, dropout_rng, previous, carry, index):
      k, v = self._split(kv, index, layer_axis)
      p = self.synqt.layer_queries(layer, previous, not train, dropout_rng)
      output = read_block(block, p, k, v, query_drop)
      attention = block('attention_weights')(p, k) if with_attention else None
      return output, attention, carry

    batch = kv.shape[0] if layer_axis else kv.shape[2]
    outputs, attentions = self._scan_layers(
        step, batch, train, self._query_drop_path_rng(train), None,
        jnp.arange(self.vit.num_layers))
    features = self._features(outputs)
    if with_attention:
      return features, jnp.moveaxis(attentions, 0, 1)
    return features

  def _scan_layers(self, step, batch, train, query_rng, carry, xs):
    """`jax.lax.scan` over the layers of `step(layer, block, query_drop,
    dropout_rng, previous, carry, x)` -> ((f, a, m), extra, carry).

    `step` gets the layer's slice of the query module's parameters (`layer`),
    its frozen block (`block(method)`: `models_vit.block_method`), its query
    stochastic depth and dropout key, and its slice `x` of `xs`; `previous` is
    f_{i-1} (zeros for layer 0). Returns the block outputs (f, a, m), each
    (B, L, D), and the stacked `extra` (L, ...).
    """
    vit = self.vit
    dropout = (jax.random.split(self.make_rng('dropout'), vit.num_layers)
               if train and self.config.dropout > 0 else None)

    def body(state, inputs):
      layer, params, query_drop, dropout_rng, x = inputs
      block = functools.partial(models_vit.block_method, vit, params)
      output, extra, carry = step(layer, block, query_drop, dropout_rng, *state, x)
      return (output[0], carry), (output, extra)

    inputs = (self.synqt.layer_params(), self.backbone.block_params,
              models_vit.drop_path_inputs(vit.num_layers, self.config.drop_path,
                                          query_rng), dropout, xs)
    previous = jnp.zeros((batch, 1, vit.hidden_size), vit.dtype)
    # Rematerialised: the backward pass re-runs a layer's query path (T queries,
    # cheap) from the layer's inputs, so it keeps no per-layer copies of the K/V.
    _, (outputs, extra) = jax.lax.scan(jax.checkpoint(body, prevent_cse=False),
                                       (previous, carry), inputs)
    return tuple(jnp.moveaxis(x[:, :, 0], 0, 1) for x in outputs), extra

  def _image_drop_rate(self, train):
    c = self.config
    return c.drop_path if train and c.image_drop_path else 0.0

  def _query_drop_path_rng(self, train):
    c = self.config
    return self.make_rng('drop_path') if train and c.drop_path > 0 else None

  def _features(self, outputs):
    """[f_{L-1}, f_0..f_{L-1}, a_0..a_{L-1}, m_0..m_{L-1}] from the block outputs."""
    feats, attn_feats, mlp_feats = outputs
    return jnp.concatenate([feats[:, -1:], feats, attn_feats, mlp_feats], axis=1)

  def image_tokens_and_drop_path_keys(self, images, train=False):
    """The image path's input tokens and the image/query stochastic-depth keys.

    The keys are drawn in the order `__call__` draws them, so a forward pass
    assembled from `block_outputs_from_tokens` has the same drop masks.
    """
    image_rng = (self.make_rng('drop_path') if self._image_drop_rate(train) > 0
                 else None)
    query_rng = self._query_drop_path_rng(train)
    tokens = jax.lax.stop_gradient(self.backbone.tokens(images))
    return tokens, image_rng, query_rng

  def block_outputs_from_tokens(self, x, image_rng, query_rng, train=False,
                                rows=None):
    """Both paths through every block from the input tokens `x` (B, N, D).

    Block i's queries read its K/V (`read_block`); the tokens advance as in
    `image_path`. `rows`: see `models_vit.drop_path`. Returns the block outputs.
    """
    vit = self.vit
    image_drop = models_vit.drop_path_inputs(
        vit.num_layers, self._image_drop_rate(train), image_rng)

    def step(layer, block, query_drop, dropout_rng, previous, x, inputs):
      index, image_drop = inputs
      k, v = block('image_kv')(x)
      p = self.synqt.layer_queries(layer, previous, not train, dropout_rng)
      output = read_block(block, p, k, v, query_drop, rows)
      x = jax.lax.cond(  # As image_path: the last block's output is unused.
          index + 1 < vit.num_layers,
          lambda: jax.lax.stop_gradient(block('advance')(x, k, v, image_drop, rows)),
          lambda: x)
      return output, None, x

    return self._scan_layers(step, x.shape[0], train, query_rng, x,
                             (jnp.arange(vit.num_layers), image_drop))[0]

  def logits_from_block_outputs(self, outputs, train=False):
    """Logits from the block outputs (f, a, m) of the query path."""
    return self._logits(self._features(outputs), train)

  def query_attention(self, images):
    """Where each layer's queries look: softmax weights (B, L, H, T, N) over image tokens."""
    return self.query_path(self.image_kv(images), with_attention=True)[1]

  def logits_from_kv(self, kv, train=False):
    return self._logits(self.query_path(kv, train), train)

  def _logits(self, features, train):
    return self.head(self.synqt.combine_features(features, not train))

  def __call__(self, images, train=False):
    """= `logits_from_kv(image_kv(images))`, the K/V kept in their own layout.

    `init` creates the parameters the scans read without running them: the
    blocks (stacked) and each layer's modules (one by one, see QuerySynthesis).
    """
    if self.is_initializing():
      self.backbone(images)
      return self.init_trainable()
    kv = self._image_path(images, train)
    return self._logits(self._query_path(kv, 0, train), train)


def read_block(block, p, k, v, drop, rows=None):
  """Queries `p` through a frozen block (`block(method)`) reading its image K/V:
  (f_i, a_i, m_i), each (B, 1, D).

  `drop`: the block's stochastic depth (`models_vit.drop_path_inputs`);
  `rows`: see `models_vit.drop_path`.
  """
  survival, keys = drop
  key = functools.partial(models_vit.branch_key, keys)
  a = models_vit.drop_path(block('attend')(p, k, v), survival, key(0), rows)
  p = p + a
  m = models_vit.drop_path(block('mlp')(p), survival, key(1), rows)
  p = p + m
  return tuple(x.mean(axis=1, keepdims=True) for x in (p, a, m))
