"""Shared fixtures: tiny random ViT checkpoints and an independent NumPy ViT.

Also starts test_parity.py's background job (the parity runs: ViT-B/16 and the small cases, ~4 minutes
of mostly single-threaded compilation) right after collection when a selected test
needs it, so that it overlaps the other tests; see test_parity.py.
"""
import math
import os
import shutil
import signal
import tempfile

import numpy as np
import pytest

from synqt_jax.testing import random_vit


@pytest.fixture
def tiny_checkpoint(tmp_path):
  """A factory: `random_vit.make(**kwargs)` written to an .npz; returns its path.

  `head=False` drops `head/*` and `pre_logits/*` (a headless checkpoint).
  """
  count = iter(range(1000))

  def make(head=True, **kwargs):
    kwargs = {**dict(width=32, depth=2, heads=2, mlp=64, patch=8, image=32,
                     classes=10), **kwargs}
    flat = random_vit.make(**kwargs)
    if not head:
      flat = {k: v for k, v in flat.items()
              if not k.startswith(('head/', 'pre_logits/'))}
    path = tmp_path / f'vit_{next(count)}.npz'
    np.savez(path, **flat)
    return str(path)

  return make


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x, approximate):
  if approximate:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def numpy_vit(flat, images, approximate_gelu=False, with_kv=False):
  """Google's ViT forward pass in float64 NumPy, straight from the flat checkpoint.

  Returns the classifier output (head logits, or the pre-logits / normed class
  token when the checkpoint has no head), and with `with_kv` also each block's
  (keys, values) of shape (B, N, H, D/H).
  """
  w = {k: np.asarray(v, np.float64) for k, v in flat.items()}
  x = np.asarray(images, np.float64)
  kernel = w['embedding/kernel']
  patch, width = kernel.shape[0], kernel.shape[-1]
  b, s = x.shape[0], x.shape[1]
  g = s // patch
  patches = x.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(b, g * g, -1) @ kernel.reshape(-1, width)
  tokens = tokens + w['embedding/bias']
  cls = np.broadcast_to(w['cls'], (b, 1, width))
  x = np.concatenate([cls, tokens], 1) + w['Transformer/posembed_input/pos_embedding']
  kvs = []
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in w:
    p = f'Transformer/encoderblock_{i}/'
    a = p + 'MultiHeadDotProductAttention_1/'
    h = _layer_norm(x, w[p + 'LayerNorm_0/scale'], w[p + 'LayerNorm_0/bias'])
    q, k, v = (np.einsum('bnd,dhe->bnhe', h, w[a + n + '/kernel']) + w[a + n + '/bias']
               for n in ('query', 'key', 'value'))
    kvs.append((k, v))
    logits = np.einsum('bthe,bnhe->bhtn', q, k) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum('bhtn,bnhe->bthe', weights, v)
    x = x + np.einsum('bthe,hed->btd', out, w[a + 'out/kernel']) + w[a + 'out/bias']
    h = _layer_norm(x, w[p + 'LayerNorm_2/scale'], w[p + 'LayerNorm_2/bias'])
    m = p + 'MlpBlock_3/'
    h = _gelu(h @ w[m + 'Dense_0/kernel'] + w[m + 'Dense_0/bias'], approximate_gelu)
    x = x + h @ w[m + 'Dense_1/kernel'] + w[m + 'Dense_1/bias']
    i += 1
  x = _layer_norm(x, w['Transformer/encoder_norm/scale'],
                  w['Transformer/encoder_norm/bias'])[:, 0]
  if 'pre_logits/kernel' in w:
    x = np.tanh(x @ w['pre_logits/kernel'] + w['pre_logits/bias'])
  if 'head/kernel' in w:
    x = x @ w['head/kernel'] + w['head/bias']
  return (x, kvs) if with_kv else x


@pytest.fixture
def numpy_vit_fn():
  return numpy_vit


# The longest files first: two pytest-xdist workers (the README's command)
# each take a whole file at a time, in this order (--no-loadscope-reorder), so
# that no long one starts last and runs alone.
LONGEST_FILES = ('test_real_data.py', 'test_sweep.py', 'test_notebooks.py')


def pytest_collection_modifyitems(items):
  rank = lambda item: (LONGEST_FILES.index(item.path.name)
                       if item.path.name in LONGEST_FILES else len(LONGEST_FILES))
  items.sort(key=rank)  # Stable: each file keeps its own order.


# --- test_parity.py's background job. ---

def pytest_collection_finish(session):
  # Under pytest-xdist every worker collects every test: the fixture starts
  # the job in the worker that runs the parity tests instead.
  if session.config.option.collectonly or 'PYTEST_XDIST_WORKER' in os.environ:
    return
  users = [item for item in session.items
           if 'parity_job' in getattr(item, 'fixturenames', ())]
  if users:
    out = tempfile.mkdtemp(prefix='synqt_parity_')
    session.config.synqt_parity_job = (users[0].module.start_job(out), out)


def pytest_sessionfinish(session):
  proc, out = getattr(session.config, 'synqt_parity_job', (None, None))
  if proc is not None:
    if proc.poll() is None:  # Stopped early (-x, Ctrl-C): end the job and its CLIs.
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    shutil.rmtree(out, ignore_errors=True)
