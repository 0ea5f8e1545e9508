"""The train state: trainable parameters, optimizer state, step and RNG key.

Created on the host as numpy arrays (unreplicated): checkpoints hold it as
it is, whatever the device count.
"""
from typing import Any

from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np

from synqt_jax.training import devices


class TrainState(train_state.TrainState):
  """Trainable parameters, optimizer state, step, and the run's base RNG key."""
  rng: jax.Array  # Raw uint32 key; step and device keys are folded from it.
  method: Any = struct.field(pytree_node=False, default=None)  # methods.*


def create_train_state(method, frozen, optimizer, seed, image_size):
  """The initial state, on the host as numpy arrays (unreplicated)."""
  init_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = method.init(init_rng, frozen, images)
  state = TrainState.create(apply_fn=method.apply, params=params, tx=optimizer,
                            rng=run_rng, method=method)
  state = jax.tree.map(np.asarray, jax.device_get(state))
  # The op-by-op initialisation's executables are not needed again, and the
  # train step compiles next (ViT-B/16 SynQT: 0.2 GB).
  devices.release_executables()
  return state
