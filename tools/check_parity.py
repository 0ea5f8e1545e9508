"""Compares synqt_jax with the PyTorch reference's saved logits and gradients.

Usage: python tools/check_parity.py BACKBONE.npz REFERENCE.npz
Exits 1 if logits differ by more than 1e-4 or a used gradient by more than 1e-3
(relative; see synqt_jax/parity.py for how round-off-level gradients are scaled).
"""
import sys

from absl import app

from synqt_jax import parity


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('usage: check_parity.py BACKBONE.npz REFERENCE.npz')
  report = parity.check(argv[1], argv[2])
  worst = sorted(report.grad_diffs.items(), key=lambda kv: -kv[1])
  print(f'logits: max |ours - reference| = {report.logit_diff:.3e} '
        f'(tolerance {parity.LOGIT_TOL:g})')
  print(f'loss:   ours {report.loss:.7f}, reference {report.reference_loss:.7f}')
  print(f'trainable parameters: {report.n_trainable:,} = the reference\'s '
        f'{report.reference_n_trainable:,} - {report.unused:,} it never uses')
  print(f'gradients: {len(worst)} used tensors; max relative difference '
        f'{worst[0][1]:.3e} (tolerance {parity.GRAD_TOL:g}); reference round-off floor '
        f'{report.roundoff_floor:.3e}, {report.below_floor} tensors below it')
  for name, diff in worst[:10]:
    print(f'  {diff:.3e}  {name}')
  failures = report.failures()
  if report.logit_diff > parity.LOGIT_TOL or failures:
    print(f'FAIL: {len(failures)} gradients out of tolerance: {failures[:10]}')
    sys.exit(1)
  print('OK: within tolerance')


if __name__ == '__main__':
  app.run(main)
