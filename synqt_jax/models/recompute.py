"""Online training that keeps almost nothing of the image path for the backward pass.

The query path of block i reads that block's image K/V, and the backward pass
visits the blocks in reverse, so by default (`image_path_memory='keep_kv'`)
every block's K/V (2·N·D values per image and block) stays alive from the
forward pass to the backward pass.

Everything before the head is per example; only the trainable parameters are
shared. So in 'recompute' mode both passes go through the batch in pieces
(`piece_images`), one after the other in a `lax.scan` (compiled once,
whatever the number of pieces):
  - forward: a piece runs the image and query paths through every block and
    keeps only its per-block query outputs (f_i, a_i, m_i);
  - backward: a piece re-runs its forward pass under `jax.vjp`, so its K/V
    are kept for that piece alone, and adds its parameter gradients.
Alive at once: the batch's input tokens and one piece's K/V (at most an
eighth of the default mode's), for twice the image-path compute. The head
runs on the whole batch, outside.

Why a custom VJP rather than `jax.checkpoint` of each scanned block: that
would keep every block's input tokens for the whole batch (half of the K/V),
and XLA:CPU removes `jax.checkpoint`'s optimization barriers before it
schedules, then merges recomputed values with the forward pass's (CSE) or
computes them early. Here a piece's recomputation starts from tokens made to
depend on the output cotangents (`synqt.after`), which no compiler can merge
with the forward pass or run early. (Inside a piece, the query path is
rematerialised per layer, as in 'keep_kv'.)

Random streams: the drop-path masks of both paths are drawn for the whole
batch and sliced (`rows`), and the head runs on the whole batch, so they equal
the 'keep_kv' path's; the query path's dropout draws its keys per piece
(`fold_in(dropout, piece)`): as distributed as the 'keep_kv' stream, not
equal.
"""
import functools

import jax
import jax.numpy as jnp

from synqt_jax.models import synqt
from synqt_jax.models import vit as models_vit

PIECES = 8  # Pieces of a batch, at most (the most that divide it evenly).
# Images in a piece on a CPU, at most. ViT-B/16 at batch 64 (8 pieces of 8
# images before): peak resident memory 1207 -> 1040 MB for steps as fast
# (33.0 against 33.4 s); one image a piece, 1012 MB but 1.2x slower: each
# piece's few query tokens re-read every frozen block's weights.
CPU_PIECE_IMAGES = 2


def piece_images(batch, backend=None):
  """Images in each piece of a batch of `batch` on `backend` (default: JAX's).

  The batch in the most pieces up to `PIECES` that divide it evenly; on a
  CPU, pieces of at most `CPU_PIECE_IMAGES` (the largest divisor up to it).
  """
  pieces = models_vit.largest_divisor(batch, PIECES)
  if (backend or jax.default_backend()) == 'cpu':
    return models_vit.largest_divisor(batch, min(batch // pieces, CPU_PIECE_IMAGES))
  return batch // pieces


def training_logits(method, trainable, frozen, images, rngs):
  """`method.apply(trainable, frozen, images, train=True, rngs=rngs)`, recomputing."""
  model = method.model
  params = {'params': {**trainable, **frozen}}
  x, image_rng, query_rng = model.apply(
      params, images, True, rngs=rngs,
      method=synqt.SynQTModel.image_tokens_and_drop_path_keys)
  keys = (image_rng, query_rng, (rngs or {}).get('dropout'))
  outputs = _recomputed(functools.partial(_piece, model), x.shape[0])(
      trainable, frozen, x, keys)
  return model.apply(params, outputs, True, rngs=rngs,
                     method=synqt.SynQTModel.logits_from_block_outputs)


def _piece(model, index, batch, trainable, frozen, x, keys):
  """Block outputs of piece `index` of a batch of `batch`, from its tokens `x`."""
  image_rng, query_rng, dropout_rng = keys
  rngs = (None if dropout_rng is None
          else {'dropout': jax.random.fold_in(dropout_rng, index)})
  return model.apply(
      {'params': {**trainable, **_waiting_for(frozen, x)}}, x, image_rng,
      query_rng, True, (index * x.shape[0], batch), rngs=rngs,
      method=synqt.SynQTModel.block_outputs_from_tokens)


def _waiting_for(frozen, x):
  """`frozen` with its vectors (norm scales, biases) made to wait for `x`.

  XLA:CPU materialises some of their broadcasts to the tokens' shape; without
  the wait it could compute each once, outside the loop, and keep it.
  """
  return jax.tree.map(lambda p: synqt.after(p, x) if p.ndim == 1 else p,
                      frozen)


def _recomputed(piece, batch):
  """`piece` over the batch in pieces, keeping only its inputs for backward.

  Gradients reach `trainable` only: the image tokens, the frozen parameters
  and the keys take none.
  """
  size = piece_images(batch)
  pieces = batch // size
  split = lambda tree: jax.tree.map(
      lambda a: a.reshape((pieces, size) + a.shape[1:]), tree)
  merge = lambda tree: jax.tree.map(
      lambda a: a.reshape((batch,) + a.shape[2:]), tree)

  def run(trainable, frozen, x, keys):
    def body(carry, inputs):
      index, x_piece = inputs
      return carry, piece(index, batch, trainable, frozen, x_piece, keys)
    _, outputs = jax.lax.scan(body, None, (jnp.arange(pieces), split(x)))
    return merge(outputs)

  @jax.custom_vjp
  def recomputed(trainable, frozen, x, keys):
    return run(trainable, frozen, x, keys)

  def forward(trainable, frozen, x, keys):
    return run(trainable, frozen, x, keys), (trainable, frozen, x, keys)

  def backward(inputs, cotangent):
    trainable, frozen, x, keys = inputs

    def body(grads, inputs):
      index, x_piece, piece_cotangent = inputs
      x_piece = synqt.after(x_piece, piece_cotangent)
      _, vjp = jax.vjp(
          lambda t: piece(index, batch, t, frozen, x_piece, keys), trainable)
      (piece_grads,) = vjp(piece_cotangent)
      return jax.tree.map(jnp.add, grads, piece_grads), None

    grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable),
                            (jnp.arange(pieces), split(x), split(cotangent)))
    return grads, None, None, None

  recomputed.defvjp(forward, backward)
  return recomputed
