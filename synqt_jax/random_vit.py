"""Random ViT checkpoints in the official Google ViT .npz layout, and random
SynQT parameters under the PyTorch reference's names.

For tests, the offline demo config and the parity check (docs/parity.md: the
reference files in tests/data were computed on `make(...)` backbones, and the small
ones on `reference_parameters(...)`). NumPy only, so that the reference's PyTorch
environment can import it too. Run as `python -m synqt_jax.random_vit out.npz [--width ...]`.

Key names and shapes follow the public imagenet21k ViT-*.npz files
(embedding/kernel HWIO, Transformer/encoderblock_i/MultiHeadDotProductAttention_1/
{query,key,value}/kernel as (D, heads, head_dim), out/kernel (heads, head_dim, D), ...).
"""
import argparse
import numpy as np


def make(width=768, depth=12, heads=12, mlp=3072, patch=16, image=224,
         classes=21843, pre_logits=True, seed=0, scale=0.02):
    rng = np.random.default_rng(seed)
    n = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)
    hd = width // heads
    tokens = 1 + (image // patch) ** 2
    w = {
        'embedding/kernel': n(patch, patch, 3, width),
        'embedding/bias': n(width),
        'cls': n(1, 1, width),
        'Transformer/posembed_input/pos_embedding': n(1, tokens, width),
        'Transformer/encoder_norm/scale': 1 + n(width),
        'Transformer/encoder_norm/bias': n(width),
        'head/kernel': n(width, classes),
        'head/bias': n(classes),
    }
    if pre_logits:
        w['pre_logits/kernel'] = n(width, width)
        w['pre_logits/bias'] = n(width)
    for i in range(depth):
        p = f'Transformer/encoderblock_{i}/'
        for ln in ('LayerNorm_0', 'LayerNorm_2'):
            w[p + ln + '/scale'] = 1 + n(width)
            w[p + ln + '/bias'] = n(width)
        a = p + 'MultiHeadDotProductAttention_1/'
        for k in ('query', 'key', 'value'):
            w[a + k + '/kernel'] = n(width, heads, hd) * 3
            w[a + k + '/bias'] = n(heads, hd)
        w[a + 'out/kernel'] = n(heads, hd, width) * 3
        w[a + 'out/bias'] = n(width)
        m = p + 'MlpBlock_3/'
        w[m + 'Dense_0/kernel'] = n(width, mlp) * 3
        w[m + 'Dense_0/bias'] = n(mlp)
        w[m + 'Dense_1/kernel'] = n(mlp, width) * 3
        w[m + 'Dense_1/bias'] = n(width)
    return w


def reference_parameters(shapes, seed, scales):
    """Random values for the reference's trainable tensors `{name: shape}`.

    Drawn in sorted name order from one generator: the queries `synqt.q` from
    U(-1, 1) and every Linear weight (out, in) and its bias from U(+-in^-1/2), as
    the reference initialises them; the learnable scalars `*attn_scale`,
    `*ffn_scale`, `*feat_scale` are `scales[...]`; the LayerNorm scales and shifts
    are 1 + U(+-0.1) and U(+-0.1) rather than PyTorch's ones and zeros, so that a
    scale/shift or epsilon mix-up changes the numbers.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        owner, leaf = name.rsplit('.', 1) if '.' in name else ('', name)
        linear = shapes.get(owner + '.weight', ())
        if name == 'synqt.q':
            bound, centre = 1.0, 0.0
        elif leaf.endswith('_scale'):
            out[name] = np.full(shape, scales[leaf], np.float32)
            continue
        elif len(linear) == 2:
            bound, centre = linear[1] ** -0.5, 0.0
        else:  # LayerNorms and the unused combine weights.
            bound, centre = 0.1, float(leaf == 'weight')
        out[name] = (centre + rng.uniform(-bound, bound, shape)).astype(np.float32)
    return out


def write(path, *args, **kwargs):
    """Writes `make(*args, **kwargs)` to `path` as an uncompressed .npz."""
    np.savez(path, **make(*args, **kwargs))


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('out')
    ap.add_argument('--width', type=int, default=768)
    ap.add_argument('--depth', type=int, default=12)
    ap.add_argument('--heads', type=int, default=12)
    ap.add_argument('--mlp', type=int, default=3072)
    ap.add_argument('--patch', type=int, default=16)
    ap.add_argument('--image', type=int, default=224)
    ap.add_argument('--classes', type=int, default=21843)
    ap.add_argument('--no-pre-logits', action='store_true')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args()
    write(a.out, a.width, a.depth, a.heads, a.mlp, a.patch, a.image, a.classes,
          not a.no_pre_logits, a.seed)
