"""`python -m synqt_jax.convert SOURCE OUTPUT`: the converter's command line.

The conversion itself (timm, Hugging Face DINOv2 and ONNX ViTs into Google's
`.npz` layout) is synqt_jax/weights/convert.py.
"""
import sys

from synqt_jax.weights import convert

if __name__ == '__main__':
  convert.main(sys.argv[1:])
