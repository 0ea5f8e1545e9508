"""Parity with the PyTorch reference (issue 3): parity.check and tools/check_parity.py.

The heavy part runs as one background job (`run_job`, this file run as a script),
started by conftest.py as soon as collection selects a test that needs it, so its
~2 minutes of mostly single-threaded XLA compilation overlap the other test files:
  1. regenerate the random ViT-B/16 backbone the reference numbers were computed
     on (random_vit.make() defaults, the digest from shared/parity/README.md) into
     a session tmp dir (413 MB);
  2. run tools/check_parity.py on it twice, side by side: on the reference file
     tests/data/official_synqt_t4.npz, and on a copy with one tampered parameter.
The reference run also records the `parity.ParityReport` its `parity.check` call
returned (a thin wrapper saves it as JSON), so the tolerances are asserted on the
very numbers the CLI judged, without a third ~60 s evaluation.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from synqt_jax import checkpoint
from synqt_jax import models_vit
from synqt_jax import parity
from synqt_jax import random_vit
from synqt_jax import synqt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, 'tests', 'data', 'official_synqt_t4.npz')
CLI = os.path.join(ROOT, 'tools', 'check_parity.py')
BACKBONE_DIGEST = 'e23182a09d3607fb82110bbd3f152f2a3e996ce373e6f9533b686d7cb061abf3'
REFERENCE_N_TRAINABLE = 2_658_204
UNUSED = 18_469  # pre_norm (12 x 2 x 768) and out_combine.weight (37): never read.

# Runs tools/check_parity.py as __main__ (argv, output and exit code as the CLI's),
# writing the report of its parity.check call to the JSON file argv[1].
RECORDING_CLI = """
import dataclasses, json, runpy, sys
from synqt_jax import parity
report_path, sys.argv = sys.argv[1], sys.argv[2:]
check = parity.check
def recording_check(*args):
  report = check(*args)
  with open(report_path, 'w') as f:
    json.dump(dataclasses.asdict(report), f, default=lambda x: x.item())
  return report
parity.check = recording_check
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_job(out):
  """The background job; writes everything into directory `out`."""
  flat = random_vit.make()
  with open(os.path.join(out, 'digest.txt'), 'w') as f:
    f.write(checkpoint.digest(flat))
  backbone = os.path.join(out, 'vit_b16_random.npz')
  np.savez(backbone, **flat)
  del flat
  reference = checkpoint.load_npz(REFERENCE)
  bias = reference['param:head.bias'].copy()
  bias[3] += 0.01
  tampered = os.path.join(out, 'tampered.npz')
  np.savez(tampered, **{**reference, 'param:head.bias': bias})
  commands = {
      'reference': [sys.executable, '-c', RECORDING_CLI,
                    os.path.join(out, 'report.json'), CLI, backbone, REFERENCE],
      'tampered': [sys.executable, CLI, backbone, tampered],
  }
  runs = {}
  for name, command in commands.items():
    with open(os.path.join(out, name + '.log'), 'w') as log:
      runs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
  for name, proc in runs.items():
    with open(os.path.join(out, name + '.rc'), 'w') as f:
      f.write(str(proc.wait()))


def start_job(out):
  """Starts `run_job(out)` in a subprocess (conftest.py calls this after collection)."""
  with open(os.path.join(out, 'job.log'), 'w') as log:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), out], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # One process group to end.


class Job:
  """The finished background job's results."""

  def __init__(self, out):
    self.out = out
    self.backbone = os.path.join(out, 'vit_b16_random.npz')

  def read(self, name):
    with open(os.path.join(self.out, name)) as f:
      return f.read()

  def cli(self, name):
    """(exit code, output) of the CLI run on the 'reference' or 'tampered' file."""
    return int(self.read(name + '.rc')), self.read(name + '.log')

  def report(self):
    return parity.ParityReport(**json.loads(self.read('report.json')))


@pytest.fixture(scope='session')
def parity_job(request, tmp_path_factory):
  """Waits for the background job (starting it here if conftest.py did not)."""
  proc, out = getattr(request.config, 'synqt_parity_job', (None, None))
  if proc is None:
    out = str(tmp_path_factory.mktemp('parity'))
    proc = start_job(out)
  if proc.wait(timeout=1200) != 0:
    with open(os.path.join(out, 'job.log')) as f:
      pytest.fail('The parity job failed:\n' + f.read())
  return Job(out)


@pytest.fixture(scope='session')
def report(parity_job):
  return parity_job.report()


def test_backbone_is_the_references(parity_job):
  assert parity_job.read('digest.txt') == BACKBONE_DIGEST  # make() itself ...
  assert checkpoint.digest(checkpoint.load_npz(parity_job.backbone)) == BACKBONE_DIGEST
  with np.load(parity_job.backbone) as f:  # ... and the file written from it.  # Reads only the members asked for.
    assert f['embedding/kernel'].shape == (16, 16, 3, 768)
    assert f['head/kernel'].shape == (768, 21843)
    assert f['pre_logits/kernel'].shape == (768, 768)
    # The reference's head_norm starts from the checkpoint's encoder norm.
    ref = checkpoint.load_npz(REFERENCE)
    np.testing.assert_array_equal(ref['param:synqt.head_norm.weight'],
                                  f['Transformer/encoder_norm/scale'])
    np.testing.assert_array_equal(ref['param:synqt.head_norm.bias'],
                                  f['Transformer/encoder_norm/bias'])


def test_logits_match_the_reference(report):
  assert report.logit_diff <= parity.LOGIT_TOL == 1e-4
  assert abs(report.loss - report.reference_loss) <= 1e-5


def test_gradients_match_the_reference(report):
  assert parity.GRAD_TOL == 1e-3
  assert report.failures() == []
  assert max(report.grad_diffs.values()) <= 1e-3
  grads = [k for k in checkpoint.load_npz(REFERENCE) if k.startswith('grad:')]
  assert len(report.grad_diffs) == len(grads) - 25 == 422  # Every used tensor compared.
  assert report.ok


def test_trainable_count_is_the_references_minus_unused_values(report):
  assert report.reference_n_trainable == REFERENCE_N_TRAINABLE
  assert report.unused == UNUSED
  assert report.n_trainable == REFERENCE_N_TRAINABLE - UNUSED == 2_639_735


def test_check_parity_cli_passes(parity_job):
  code, out = parity_job.cli('reference')
  assert code == 0, out
  assert 'OK: within tolerance' in out
  assert 'trainable parameters: 2,639,735' in out


def test_check_parity_cli_fails_on_a_tampered_parameter(parity_job):
  code, out = parity_job.cli('tampered')
  assert code == 1, out
  assert 'FAIL' in out and 'OK: within tolerance' not in out


def test_a_file_that_is_not_a_reference(tmp_path):
  path = tmp_path / 'x.npz'
  np.savez(path, images=np.zeros((1, 8, 8, 3)))
  with pytest.raises(checkpoint.CheckpointError, match='not a reference parity file'):
    parity.load_reference(str(path))


def test_check_tree_names_what_does_not_fit():
  vit = models_vit.ViTConfig(16, 1, 2, 32, 8, 16)
  model = synqt.SynQTModel(vit, synqt.SynQTConfig(num_classes=3))
  images = np.zeros((1, 16, 16, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
  shapes.pop('backbone')
  trainable = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  parity.check_tree(model, trainable, images)  # Fits.
  del trainable['synqt']['head_norm']
  trainable['head']['kernel'] = np.zeros((16, 4), np.float32)
  with pytest.raises(checkpoint.CheckpointError) as e:
    parity.check_tree(model, trainable, images)
  assert 'synqt/head_norm/scale' in str(e.value)
  assert 'head/kernel: expected (16, 3), found (16, 4)' in str(e.value)


if __name__ == '__main__':
  run_job(sys.argv[1])
