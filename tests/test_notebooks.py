"""The Colab notebooks run top to bottom, offline, and draw their figures.

The training notebook runs with its tiny offline parameters on eight simulated
devices (Colab TPU runtimes have one chip or eight cores); the prediction
notebook then loads that run's export on one device. Their install and
cache-choice logic (`colab_setup`) is checked for TPU, GPU and CPU runtimes.
"""
import glob
import os
import sys

import nbclient
import nbformat
import pytest

from synqt_jax import colab_setup
from synqt_jax.models import vit as models_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name, parameters, cwd, env):
  notebook = nbformat.read(os.path.join(REPO, 'colab', name), as_version=4)
  cell = next(c for c in notebook.cells if 'parameters' in c.metadata.get('tags', []))
  cell.source += '\n# Injected by the test.\n' + '\n'.join(
      f'{key} = {value!r}' for key, value in parameters.items())
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(cwd)}})
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    client.execute()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  return notebook


def figures(notebook):
  return sum('image/png' in output.get('data', {})
             for cell in notebook.cells if cell.cell_type == 'code'
             for output in cell.get('outputs', []))


def outputs_text(notebook):
  return '\n'.join(output.get('text', '') for cell in notebook.cells
                   if cell.cell_type == 'code' for output in cell.get('outputs', []))


def test_notebooks_train_then_predict(tmp_path):
  workdir = str(tmp_path / 'run')
  trained = run_notebook(
      'train_synqt.ipynb',
      dict(OFFLINE=True, INSTALL=False, REPO_DIR=REPO, WORKDIR=workdir,
           FEATURE_CACHE='auto'),
      tmp_path, {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  text = outputs_text(trained)
  assert '8 device(s)' in text
  assert 'offline demo: host cache (float32).' in text
  jax_command = ' '.join(colab_setup.jax_install_command(colab_setup.detect_runtime()))
  assert 'would run: ' + jax_command in text  # INSTALL=False: shown, not run.
  assert figures(trained) == 2  # The curves and the memory comparison.
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  for method in ('linear', 'synqt', 'lora', 'full'):
    assert method in text

  predicted = run_notebook(
      'predict_and_attention.ipynb',
      dict(WORKDIR=workdir, INSTALL=False, REPO_DIR=REPO, NUM_IMAGES=2),
      tmp_path, {'XLA_FLAGS': ''})
  assert figures(predicted) == 1 + 2  # The classified images, one attention figure each.

  # With EXPORT set, WORKDIR is not read at all (here it does not exist).
  files = sorted(glob.glob(os.path.join(workdir, 'tiny_data', '**', '*.png'),
                          recursive=True))[:3]
  assert len(files) == 3
  exported = run_notebook(
      'predict_and_attention.ipynb',
      dict(EXPORT=os.path.join(workdir, 'export.npz'), WORKDIR=str(tmp_path / 'absent'),
           IMAGE_FILES=files, INSTALL=False, REPO_DIR=REPO, NUM_IMAGES=3),
      tmp_path, {'XLA_FLAGS': ''})
  assert figures(exported) == 1 + 3
  assert not os.path.exists(tmp_path / 'absent')


def test_notebooks_have_an_empty_repo_url_form_field():
  for name in ('train_synqt.ipynb', 'predict_and_attention.ipynb'):
    notebook = nbformat.read(os.path.join(REPO, 'colab', name), as_version=4)
    cell = next(c for c in notebook.cells if 'parameters' in c.metadata.get('tags', []))
    assert "REPO_URL = ''  # @param {type:\"string\"}" in cell.source


RUNTIMES = {  # What a Colab runtime exposes before JAX is installed, and its kind.
    'tpu_vm': (dict(), {'/dev/accel0'}, None, 'tpu'),
    'tpu_v5e': (dict(), {'/dev/vfio/0'}, None, 'tpu'),
    'tpu_node': (dict(COLAB_TPU_ADDR='10.0.0.2:8470'), set(), None, 'tpu'),
    'gpu': (dict(), {'/dev/nvidia0'}, '/usr/bin/nvidia-smi', 'gpu'),
    'cpu': (dict(), set(), None, 'cpu'),
}


@pytest.mark.parametrize('name', list(RUNTIMES))
def test_install_cell_installs_the_jax_of_the_runtime(name):
  environ, files, nvidia_smi, expected = RUNTIMES[name]
  runtime = colab_setup.detect_runtime(
      environ, exists=files.__contains__,
      which=lambda tool: nvidia_smi if tool == 'nvidia-smi' else None)
  assert runtime == expected
  jax, package = colab_setup.install_commands(runtime, '/content/synqt_jax')
  assert jax == [sys.executable, '-m', 'pip', 'install', '-q', '-U',
                 {'tpu': 'jax[tpu]', 'gpu': 'jax[cuda12]', 'cpu': 'jax'}[runtime]]
  assert package == [sys.executable, '-m', 'pip', 'install', '-q', '-e',
                     '/content/synqt_jax']


VIT_B16 = models_vit.ViTConfig(768, 12, 12, 3072, 16, 224)
VIT_B16_PARAMS = 85_798_656  # Headless ViT-B/16.
GB16 = 16e9


def test_cache_choice_for_a_16_gb_device_shows_its_arithmetic():
  """1000 VTAB-1k images of ViT-B/16: 7.27 GB in bfloat16 fits half of 16 GB after
  the 0.34 GB backbone; float32 (14.5 GB) would not have fitted beside the step."""
  mode, dtype, line = colab_setup.choose_cache(1000, VIT_B16, GB16, 1, 4 * VIT_B16_PARAMS)
  assert (mode, dtype) == ('device', 'bfloat16')
  assert colab_setup.cache_bytes(1000, VIT_B16, 2) == 1001 * 12 * 2 * 197 * 768 * 2
  assert '1001 x 12 layers x 2 x 197 tokens x 768 x 2 B / 1 device(s) = 7.27 GB' in line
  assert '= 7.66 GB: fits' in line
  # Twice the images do not fit one 16 GB device, but do fit eight.
  assert colab_setup.choose_cache(2000, VIT_B16, GB16, 1, 4 * VIT_B16_PARAMS)[:2] == (
      'host', 'float32')
  assert colab_setup.choose_cache(2000, VIT_B16, GB16, 8, 4 * VIT_B16_PARAMS)[0] == 'device'
  # No accelerator memory reported (CPU): host.
  assert colab_setup.choose_cache(1000, VIT_B16, None)[:2] == ('host', 'float32')


@pytest.mark.parametrize('num_images', [100, 1000, 1100, 1200, 5000, 50000])
def test_no_cache_choice_exceeds_a_16_gb_device(num_images):
  mode, _, _ = colab_setup.choose_cache(num_images, VIT_B16, GB16, 1, 4 * VIT_B16_PARAMS)
  if mode == 'device':
    assert (colab_setup.cache_bytes(num_images, VIT_B16, 2) + 4 * VIT_B16_PARAMS
            <= colab_setup.DEVICE_CACHE_SHARE * GB16)
