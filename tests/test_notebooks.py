"""The Colab notebooks run top to bottom, offline, and draw their figures.

The training notebook runs with its tiny offline parameters on eight simulated
devices (Colab TPU runtimes have one chip or eight cores); the prediction
notebook then loads that run's workdir on one device.
"""
import os

import nbclient
import nbformat

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
           FEATURE_CACHE='host'),
      tmp_path, {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  text = outputs_text(trained)
  assert '8 device(s)' in text
  assert figures(trained) == 2  # The curves and the memory comparison.
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  for method in ('linear', 'synqt', 'lora', 'full'):
    assert method in text

  predicted = run_notebook(
      'predict_and_attention.ipynb',
      dict(WORKDIR=workdir, INSTALL=False, REPO_DIR=REPO, NUM_IMAGES=2),
      tmp_path, {'XLA_FLAGS': ''})
  assert figures(predicted) == 1 + 2  # The classified images, one attention figure each.
