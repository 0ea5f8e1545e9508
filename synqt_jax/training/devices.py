"""The pmapped axis, and trees copied between the host and every local device.

Every step runs under `jax.pmap` over the local devices with axis `AXIS`;
sums over it (`jax.lax.psum`) cover every device of every host.
"""
import jax
import numpy as np

from synqt_jax.training import host_memory

AXIS = 'batch'  # The pmapped axis: one entry per device of every host.


def replicate(tree):
  """A copy of `tree` on every local device, laid out as pmap's own outputs.

  Each device's copy is put straight from the host array: no host array of
  all the copies stacked, and on a CPU device a 64-byte aligned host array
  becomes the device buffer itself.
  (flax.jax_utils.replicate names its mesh axis differently from the pmapped
  axis, which makes pmap compile a second time on the second step.)
  """
  devices = jax.local_devices()
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                               jax.P(AXIS))

  def put(x):
    one = np.asarray(x)[None]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + one.shape[1:], sharding,
        [jax.device_put(one, device) for device in devices])

  return jax.tree.map(put, tree)


def unreplicate(tree):
  """Device 0's copy of a replicated tree, as host numpy arrays.

  Reads one local shard directly: no compiled indexing op, and it works on
  every host of a multi-host run.
  """
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]),
      tree)


def replicated_spec(tree):
  """The shapes and dtypes `replicate(tree)` has, of a host tree or of its
  `jax.ShapeDtypeStruct`s: what a step compiles for before anything is placed."""
  devices = jax.local_device_count()

  def spec(x):
    x = x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)
    return jax.ShapeDtypeStruct((devices,) + x.shape, x.dtype)

  return jax.tree.map(spec, tree)


def release_executables():
  """Drops JAX's cached executables and traces (a compiled step its caller
  holds stays) and hands the heap they freed back to the system."""
  jax.clear_caches()
  host_memory.return_freed()
