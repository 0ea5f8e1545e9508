"""Compares synqt_jax with the PyTorch reference's saved logits and gradients.

Usage:
  python tools/check_parity.py                     # every tests/data/parity/*.npz
  python tools/check_parity.py REFERENCE.npz ...   # files that name their backbone
  python tools/check_parity.py --backbone vit.npz tests/data/official_synqt_t4.npz

Each file passes when this project and the reference are equally close to a float64
evaluation (logits within 1e-4, gradients within 1e-3 relative, or within a factor
2 of each other; see synqt_jax/testing/parity.py). Exits 1 if any file fails.
"""
import argparse
import glob
import os
import sys

from synqt_jax import errors
from synqt_jax.testing import parity

CASES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'tests', 'data', 'parity')


def show(path, report):
  """Prints one file's figures; returns whether it passed."""
  logits_ours, logits_ref = report.logit_errors
  print(f'== {path}')
  print(f'logits: max |ours - reference| = {report.logit_diff:.3e}; from float64: '
        f'ours {logits_ours:.3e}, reference {logits_ref:.3e} (tolerance '
        f'{parity.LOGIT_TOL:g})')
  print(f'loss:   ours {report.loss:.7f}, reference {report.reference_loss:.7f}')
  print(f'trainable parameters: {report.n_trainable:,} = the reference\'s '
        f'{report.reference_n_trainable:,} - {report.unused:,} it never uses')
  worst = report.worst()
  print(f'gradients: {len(worst)} used tensors compared; relative distance from '
        f'float64 (tolerance {parity.GRAD_TOL:g}, or within {parity.ROUNDOFF_RATIO:g}x '
        f'of each other; round-off floor {report.roundoff_floor:.3e}):')
  for name, (ours, ref) in worst[:5]:
    print(f'  ours {ours:.3e}  reference {ref:.3e}  {name}')
  print(f'  (max |ours - reference| relative: {max(report.grad_diffs.values()):.3e})')
  failures = report.failures()
  if report.ok:
    print('OK: within tolerance')
  else:
    print(f'FAIL: logits {"agree" if report.logits_ok else "differ"}; '
          f'{len(failures)} gradients differ: {failures[:10]}')
  return report.ok


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('references', nargs='*', help='reference files (default: the '
                  'cases in tests/data/parity)')
  ap.add_argument('--backbone', help='the backbone .npz, for files that do not '
                  'name theirs (official_synqt_t4.npz)')
  a = ap.parse_args(argv)
  paths = a.references or sorted(glob.glob(os.path.join(CASES_DIR, '*.npz')))
  if not paths:
    sys.exit(f'No reference files in {CASES_DIR}; pass some.')
  passed = []
  for path in paths:
    try:
      passed.append(show(path, parity.check(a.backbone, path)))
    except errors.CheckpointError as e:
      sys.exit(f'{path}: {e}')
  print(f'{sum(passed)} of {len(paths)} reference files pass.')
  sys.exit(0 if all(passed) else 1)


if __name__ == '__main__':
  main()
