"""Online training that keeps almost nothing of the image path for the backward pass.

The query path of block i reads that block's image K/V, and the backward pass
visits the blocks in reverse, so by default (`image_path_memory='keep_kv'`)
every block's K/V (2·N·D values per image and block) stays alive from the
forward pass to the backward pass. In 'recompute' mode:
  - the forward pass keeps only the input tokens (N·D) of each segment of
    about sqrt(L) blocks;
  - the backward pass of a segment re-runs it from those tokens, keeping the
    input tokens of each of its blocks;
  - the backward pass of a block recomputes its K/V from its tokens.
So about 2·sqrt(L) token arrays and one block's K/V are alive at a time, for
about twice the image-path compute (`SynQTModel.image_and_query_block` also
runs the image path's attention and MLP in batch chunks, so their activations
stay small).

Why custom VJPs rather than `jax.checkpoint`: XLA:CPU removes
`jax.checkpoint`'s optimization barriers before it schedules, and then merges
recomputed K/V with the forward pass's (CSE) or computes them early, keeping
what rematerialisation was meant to free. Here a recomputation starts from
tokens made to depend on the cotangents of its outputs (`synqt.after`), which
no compiler can merge with the forward pass or move before them; likewise a
block's next tokens wait for its queries, so that the image path cannot run
ahead of the query path with every K/V in between alive.

Random streams: the drop-path masks of both paths and the head's randomness
equal the 'keep_kv' path's; the query path's dropout draws its keys per block
(`fold_in(dropout, i)`): as distributed as the 'keep_kv' stream, not equal.
"""
import functools

import jax

from synqt_jax import synqt


def training_logits(method, trainable, frozen, images, rngs):
  """`method.apply(trainable, frozen, images, train=True, rngs=rngs)`, recomputing."""
  model = method.model
  params = {'params': {**trainable, **frozen}}
  x, image_rng, query_rng = model.apply(
      params, images, True, rngs=rngs,
      method=synqt.SynQTModel.image_tokens_and_drop_path_keys)
  keys = (image_rng, query_rng, (rngs or {}).get('dropout'))
  num_layers = method.vit.num_layers
  size = max(1, round(num_layers ** 0.5))
  previous, outputs = None, []
  for start in range(0, num_layers, size):
    blocks = tuple(range(start, min(start + size, num_layers)))
    segment = _recomputed(functools.partial(_segment, model, blocks))
    x, segment_outputs = segment(trainable, frozen, x, previous, keys)
    outputs += segment_outputs
    previous = outputs[-1][0]
  return model.apply(params, outputs, True, rngs=rngs,
                     method=synqt.SynQTModel.logits_from_block_outputs)


def _segment(model, blocks, trainable, frozen, x, previous, keys):
  """`blocks` of both paths, each block recomputed in its own backward pass."""
  outputs = []
  for i in blocks:
    block = _recomputed(functools.partial(_block, model, i))
    x, output = block(trainable, frozen, x, previous, keys)
    outputs.append(output)
    previous = output[0]
  return x, outputs


def _block(model, i, trainable, frozen, x, previous, keys):
  """Block i of both paths; the next tokens wait for this block's queries.

  The frozen vectors (LayerNorm scales and biases, dense biases) are made to
  wait for `x` as well: XLA:CPU materialises some of their broadcasts to the
  tokens' shape, and would otherwise compute each once, early, and keep it for
  every recomputation of the block.
  """
  image_rng, query_rng, dropout_rng = keys
  rngs = (None if dropout_rng is None
          else {'dropout': jax.random.fold_in(dropout_rng, i)})
  frozen = jax.tree.map(lambda p: synqt.after(p, x) if p.ndim == 1 else p,
                        frozen)
  x, output = model.apply({'params': {**trainable, **frozen}}, i, x, previous,
                          image_rng, query_rng, True, rngs=rngs,
                          method=synqt.SynQTModel.image_and_query_block)
  return synqt.after(x, output), output


def _recomputed(fn):
  """`fn(trainable, frozen, x, previous, keys)`, keeping only its inputs for backward.

  Its backward pass re-runs `fn` once the output cotangents exist. Gradients
  reach `trainable` and `previous` only: the image tokens `x` and the frozen
  parameters take none.
  """

  @jax.custom_vjp
  def recomputed(trainable, frozen, x, previous, keys):
    return fn(trainable, frozen, x, previous, keys)

  def forward(trainable, frozen, x, previous, keys):
    inputs = (trainable, frozen, x, previous, keys)
    return fn(*inputs), inputs

  def backward(inputs, cotangent):
    trainable, frozen, x, previous, keys = inputs
    x = synqt.after(x, cotangent)
    _, vjp = jax.vjp(lambda t, p: fn(t, frozen, x, p, keys), trainable, previous)
    trainable_cotangent, previous_cotangent = vjp(cotangent)
    return trainable_cotangent, None, None, previous_cotangent, None

  recomputed.defvjp(forward, backward)
  return recomputed

