"""What the Colab notebooks' first cells decide: which JAX to install, which cache fits.

Importable without JAX (the install cell runs before JAX is right for the
runtime), so tests can ask which command it would run on a TPU, GPU or CPU
runtime and which feature cache it would pick for a 16 GB device.
"""
import os
import shutil
import sys

RUNTIMES = ('tpu', 'gpu', 'cpu')
JAX_PACKAGES = {'tpu': 'jax[tpu]', 'gpu': 'jax[cuda12]', 'cpu': 'jax'}
# The device cache may take at most this share of one device's memory, after
# the backbone: the rest is for the step, XLA's temporaries and fragmentation.
DEVICE_CACHE_SHARE = 0.5
BFLOAT16_BYTES = 2
FLOAT32_BYTES = 4
GB = 1e9


def detect_runtime(environ=None, exists=os.path.exists, which=shutil.which):
  """'tpu', 'gpu' or 'cpu', from what a Colab runtime exposes before JAX is installed.

  TPU VMs have /dev/accel* (or /dev/vfio for v5e and later); older Colab TPU
  runtimes set COLAB_TPU_ADDR. A GPU runtime has nvidia-smi.
  """
  environ = os.environ if environ is None else environ
  if ('COLAB_TPU_ADDR' in environ or 'TPU_NAME' in environ
      or exists('/dev/accel0') or exists('/dev/vfio/0')):
    return 'tpu'
  if which('nvidia-smi') or exists('/dev/nvidia0'):
    return 'gpu'
  return 'cpu'


def jax_install_command(runtime):
  """The pip command that installs JAX for `runtime` (see `JAX_PACKAGES`)."""
  if runtime not in RUNTIMES:
    raise ValueError(f'runtime={runtime!r}; expected one of {RUNTIMES}.')
  return [sys.executable, '-m', 'pip', 'install', '-q', '-U', JAX_PACKAGES[runtime]]


def install_commands(runtime, repo_dir):
  """The pip commands of the install cell: JAX for `runtime`, then the cloned package."""
  return [jax_install_command(runtime),
          [sys.executable, '-m', 'pip', 'install', '-q', '-e', repo_dir]]


def cache_bytes(num_images, vit, value_bytes):
  """Bytes of a feature cache: (n + 1 padding row) x L x 2 (K, V) x N x D values."""
  return ((num_images + 1) * vit.num_layers * 2 * vit.num_tokens * vit.hidden_size
          * value_bytes)


def choose_cache(num_images, vit, device_bytes, num_devices=1, backbone_bytes=0):
  """('device', 'bfloat16') if that cache fits a device, else ('host', 'float32').

  Returns `(mode, storage_dtype, arithmetic)`, the last a line that shows the
  sum. `device_bytes` is one device's memory (None on CPU: always 'host'); the
  device cache is sharded over `num_devices`.
  """
  if not device_bytes:
    return 'host', 'float32', 'no accelerator memory reported: host cache (float32).'
  per_device = cache_bytes(num_images, vit, BFLOAT16_BYTES) / num_devices
  budget = DEVICE_CACHE_SHARE * device_bytes - backbone_bytes
  sum_line = (
      f'bfloat16 cache: {num_images + 1} x {vit.num_layers} layers x 2 x '
      f'{vit.num_tokens} tokens x {vit.hidden_size} x {BFLOAT16_BYTES} B / '
      f'{num_devices} device(s) = {per_device / GB:.2f} GB per device; budget '
      f'{DEVICE_CACHE_SHARE:.0%} of {device_bytes / GB:.2f} GB - backbone '
      f'{backbone_bytes / GB:.2f} GB = {budget / GB:.2f} GB')
  if per_device <= budget:
    return 'device', 'bfloat16', sum_line + ': fits, device cache (bfloat16).'
  host = cache_bytes(num_images, vit, FLOAT32_BYTES) / GB
  return 'host', 'float32', (sum_line + f': does not fit, host cache (float32, '
                             f'{host:.2f} GB of host RAM).')


def device_memory_bytes(device):
  """A JAX device's memory limit in bytes, or None where it reports none (CPU)."""
  stats = device.memory_stats() or {}
  return stats.get('bytes_limit')
