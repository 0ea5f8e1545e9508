"""README's "Extending" holds: a new method is its module and one registry
entry, and a folder of your own images needs no code at all.

A copy of the package gets a toy method (a linear probe whose logits are
scaled by a config field) in the two places the README names, and nothing
else; launch.py then trains it on a generated ImageFolder through
configs/folder.py, with its field set from the command line.
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from synqt_jax.testing import random_vit
from training_runs import REPO

TOY_MODULE = '''"""A toy method: the linear probe, its logits scaled by `scale`."""
import dataclasses

from synqt_jax.models import baselines


@dataclasses.dataclass(frozen=True)
class ScaledProbe(baselines.LinearProbe):
  scale: float = 1.0

  def apply(self, trainable, frozen, images, train=False, rngs=None):
    return self.scale * super().apply(trainable, frozen, images, train, rngs)
'''
TOY_ENTRY = '''    'toy': Registered(toy.ScaledProbe, fields=(
        config_fields.Field('scale', 1.0, config_fields.is_real, 'a number'),)),
'''
PACKAGE_FILES = ('synqt_jax', 'configs', 'launch.py')


def _image_folder(root, rng):
  """train/ and test/ of two classes a ViT tells apart: dark and bright."""
  for split, count in (('train', 48), ('test', 24)):
    for label, level in (('dark', 60), ('bright', 190)):
      directory = os.path.join(root, split, label)
      os.makedirs(directory)
      for i in range(count):
        pixels = np.clip(rng.normal(level, 25, (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(
            os.path.join(directory, f'{i}.png'))


def _changed_files(original, copy):
  """Paths (relative) that differ between two trees, or exist in one only."""
  changed = []
  comparison = filecmp.dircmp(original, copy, ignore=['__pycache__'])
  stack = [('', comparison)]
  while stack:
    prefix, c = stack.pop()
    changed += [os.path.join(prefix, n)
                for n in c.left_only + c.right_only + c.diff_files]
    stack += [(os.path.join(prefix, n), sub) for n, sub in c.subdirs.items()]
  return sorted(changed)


def test_a_new_method_is_its_module_and_one_registry_entry(tmp_path):
  copy = tmp_path / 'repo'
  for name in PACKAGE_FILES:
    source = os.path.join(REPO, name)
    if os.path.isdir(source):
      shutil.copytree(source, copy / name,
                      ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(source, copy / name)
  (copy / 'synqt_jax' / 'models' / 'toy.py').write_text(TOY_MODULE)
  methods_py = copy / 'synqt_jax' / 'models' / 'methods.py'
  text = methods_py.read_text()
  assert text.count('REGISTRY = {\n') == 1
  text = text.replace('REGISTRY = {\n', 'REGISTRY = {\n' + TOY_ENTRY)
  text = text.replace('from synqt_jax.models import synqt\n',
                      'from synqt_jax.models import synqt\n'
                      'from synqt_jax.models import toy\n')
  methods_py.write_text(text)
  assert _changed_files(REPO + '/synqt_jax', copy / 'synqt_jax') == [
      'models/methods.py', 'models/toy.py']

  data = tmp_path / 'shades'
  _image_folder(str(data), np.random.default_rng(0))
  backbone = tmp_path / 'vit.npz'
  random_vit.write(str(backbone), width=32, depth=1, heads=2, mlp=64, patch=8,
                   image=32, classes=10, pre_logits=False, seed=0, scale=0.1)
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config', f'configs/folder.py:{data}',
       '--workdir', str(workdir), '--config.method=toy',
       '--config.toy.scale=2.0', f'--config.backbone.source={backbone}',
       '--config.data.image_size=32', '--config.data.normalization=inception',
       '--config.optim.batch_size=32', '--config.optim.epochs=8',
       '--config.optim.warmup_epochs=1', '--config.optim.lr=0.03',
       '--config.eval_every_epochs=8'],
      cwd=copy, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(copy)})
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  with open(workdir / 'config.json') as f:
    config = json.load(f)
  assert results['method'] == 'toy' and config['toy'] == {'scale': 2.0}
  assert results['trainable_params'] == 32 * 2 + 2  # The head: 2 classes.
  assert results['test_accuracy'] >= 0.9
