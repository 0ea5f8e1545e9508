"""The train and evaluation steps, run under `jax.pmap` (axis `devices.AXIS`).

Gradients and counts are summed over every device of every host, so one
code path serves one CPU, eight GPUs and a pod slice. `train_steps` updates
the members of a run together: one member (a single run) takes `train_step`
itself; several (a sweep's stack of combinations) share one `jax.vmap` of
`gradients` over their stacked parameters, keys and steps.
"""
import functools
import time

from absl import logging
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from synqt_jax.training import devices


def logits_of(method, params, frozen, batch, train, rngs=None):
  """The model's logits for a batch; the one place that reads its inputs.

  A batch holds 'image' (online: `method.apply`) or 'kv' (cached image-path
  K/V, `feature_cache`: `method.apply_kv`, which runs only the query path).
  """
  if 'kv' in batch:  # In train.cache_dtype: the query path casts each block's.
    return method.apply_kv(params, frozen, batch['kv'], train=train, rngs=rngs)
  return method.apply(params, frozen, batch['image'], train=train, rngs=rngs)


def gradients(method, params, rng, step, frozen, batch):
  """(loss, gradients) of the global batch (run under pmap, axis 'batch').

  The loss is the mean cross-entropy over the real (mask 1) examples of the
  global batch, and so is the gradient, whatever the device count. Each device
  draws its own dropout and drop-path keys, fold_in(fold_in(rng, step),
  device index).
  """
  device_rng = jax.random.fold_in(jax.random.fold_in(rng, step),
                                  jax.lax.axis_index(devices.AXIS))
  dropout_rng, drop_path_rng = jax.random.split(device_rng)
  rngs = {'dropout': dropout_rng, 'drop_path': drop_path_rng}
  global_count = jax.lax.psum(batch['mask'].sum(), devices.AXIS)

  def loss_fn(params):
    logits = logits_of(method, params, frozen, batch, True, rngs)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['label'])
    return jnp.sum(batch['mask'] * losses) / global_count

  local_loss, local_grads = jax.value_and_grad(loss_fn)(params)
  # One all-reduce for the whole gradient, not one per tensor.
  local_flat, unflatten = jax.flatten_util.ravel_pytree(local_grads)
  loss, flat_grads = jax.lax.psum((local_loss, local_flat), devices.AXIS)
  return loss, unflatten(flat_grads)


def apply_update(state, loss, grads, learning_rate_fn):
  """(state after the optimizer's update with `grads`, the step's metrics)."""
  metrics = {'loss': loss, 'learning_rate': learning_rate_fn(state.step)}
  return state.apply_gradients(grads=grads), metrics


def train_step(state, frozen, batch, learning_rate_fn):
  """One optimizer update on the global batch (run under pmap, axis 'batch')."""
  loss, grads = gradients(state.method, state.params, state.rng, state.step,
                          frozen, batch)
  return apply_update(state, loss, grads, learning_rate_fn)


def train_steps(states, frozen, batch, learning_rate_fns):
  """One update of every member on the same batch; (states, metrics), tuples.

  Several members' gradients come from one `jax.vmap` of `gradients` (the
  batch and the frozen backbone are shared; the group's program, `method`,
  is the first member's: the others differ only in their parameters); each
  member's own optimizer then applies its own.
  """
  if len(states) == 1:
    state, metrics = train_step(states[0], frozen, batch, learning_rate_fns[0])
    return (state,), (metrics,)
  stacked = jax.tree.map(lambda *x: jnp.stack(x),
                         *[(s.params, s.rng, s.step) for s in states])
  losses, grads = jax.vmap(functools.partial(gradients, states[0].method),
                           in_axes=(0, 0, 0, None, None))(*stacked, frozen,
                                                          batch)
  updated = [apply_update(state, losses[i],
                          jax.tree.map(lambda g, i=i: g[i], grads), fn)
             for i, (state, fn) in enumerate(zip(states, learning_rate_fns))]
  return tuple(s for s, _ in updated), tuple(m for _, m in updated)


def counts(logits, label, mask):
  """Correct predictions and real examples of a global batch (under pmap)."""
  correct = (jnp.argmax(logits, -1) == label) * mask
  return jax.lax.psum({'correct': correct.sum(), 'count': mask.sum()},
                      devices.AXIS)


def eval_step(method, params, frozen, batch):
  """`counts` of the model's predictions for a batch (under pmap)."""
  return counts(logits_of(method, params, frozen, batch, False),
                batch['label'], batch['mask'])


def compiler_options():
  """XLA options for the train step on this backend.

  XLA:CPU's newer fusion emitters took ~0.65 GB of host memory to compile a
  ViT-B/16 SynQT step, the classic ones ~0.25 GB, for steps as fast (within
  the ~5 % noise of a 2-core CPU).
  """
  return ({'xla_cpu_use_fusion_emitters': False}
          if jax.default_backend() == 'cpu' else {})


def compile_train_steps(states, frozen_spec, batch_spec, learning_rate_fns):
  """The pmapped `train_steps`, compiled for host trees before any is placed.

  `states`: the members' host states; `frozen_spec`, `batch_spec`: the
  frozen tree's and a batch's abstract shapes (one device's). Compiling holds
  host memory that is freed afterwards (~0.25 GB for a ViT-B step on a CPU,
  `compiler_options`): done first, it does not stack on the backbone, the
  state and a feature cache. Over several processes pmap lowers concrete
  arrays only: there it compiles at its first call.
  """
  step = jax.pmap(functools.partial(train_steps,
                                    learning_rate_fns=tuple(learning_rate_fns)),
                  axis_name=devices.AXIS, donate_argnums=(0,))
  if jax.process_count() > 1:
    return step
  start = time.perf_counter()
  compiled = step.lower(devices.replicated_spec(tuple(states)),
                        devices.replicated_spec(frozen_spec),
                        batch_spec).compile(compiler_options())
  logging.info('Compiled the train step in %.1f s.', time.perf_counter() - start)
  return compiled
