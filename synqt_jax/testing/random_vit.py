"""Random ViT checkpoints in the official Google ViT .npz layout, and random
SynQT parameters under the PyTorch reference's names.

For tests, the offline demo config and the parity check (docs/parity.md: the
reference files in tests/data were computed on `make(...)` backbones, and the small
ones on `reference_parameters(...)`). NumPy only, so that the reference's PyTorch
environment can import it too. Run as `python -m synqt_jax.testing.random_vit out.npz [--width ...]`.

Key names and shapes follow the public imagenet21k ViT-*.npz files
(embedding/kernel HWIO, Transformer/encoderblock_i/MultiHeadDotProductAttention_1/
{query,key,value}/kernel as (D, heads, head_dim), out/kernel (heads, head_dim, D), ...).
`classifier='gap'` drops the class token; `resnet=(3, 4, 9)` adds an R50+ViT
hybrid's stem (conv_root, gn_root, blockS/unitK/..., GroupNorm parameters stored
(1, 1, 1, C) as in the published R50+ViT-B_16.npz). `linen_names`,
`opt_target` and `big_vision` rewrite such a file in the other layouts Google's
ViTs come in.
"""
import argparse
import numpy as np


def make(width=768, depth=12, heads=12, mlp=3072, patch=16, image=224,
         classes=21843, pre_logits=True, seed=0, scale=0.02, classifier='token',
         resnet=None, resnet_width=64):
    rng = np.random.default_rng(seed)
    n = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)
    hd = width // heads
    channels, stride = 3, 1
    stem = {}
    if resnet:
        stem = resnet_stem(n, resnet, resnet_width)
        channels = resnet_width * 2 ** (len(resnet) - 1) * 4
        stride = 4 * 2 ** (len(resnet) - 1)
    tokens = (classifier == 'token') + (image // (patch * stride)) ** 2
    # Drawn in this order for every seed (the parity files depend on it).
    w = {**stem, 'embedding/kernel': n(patch, patch, channels, width),
         'embedding/bias': n(width)}
    if classifier == 'token':
        w['cls'] = n(1, 1, width)
    w.update({
        'Transformer/posembed_input/pos_embedding': n(1, tokens, width),
        'Transformer/encoder_norm/scale': 1 + n(width),
        'Transformer/encoder_norm/bias': n(width),
        'head/kernel': n(width, classes),
        'head/bias': n(classes),
    })
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


def resnet_stem(n, units, width):
    """The hybrids' stem weights: `units` bottleneck units per stage, root `width`."""
    gn = lambda name, c: {f'{name}/scale': 1 + n(1, 1, 1, c), f'{name}/bias': n(1, 1, 1, c)}
    w = {'conv_root/kernel': n(7, 7, 3, width), **gn('gn_root', width)}
    cin = width
    for s, count in enumerate(units):
        f = width * 2 ** s
        for u in range(count):
            p = f'block{s + 1}/unit{u + 1}/'
            if u == 0:
                w[p + 'conv_proj/kernel'] = n(1, 1, cin, 4 * f)
                w.update(gn(p + 'gn_proj', 4 * f))
            for i, (k, a, b) in enumerate([(1, cin if u == 0 else 4 * f, f), (3, f, f),
                                           (1, f, 4 * f)]):
                w[p + f'conv{i + 1}/kernel'] = n(k, k, a, b)
                w.update(gn(p + f'gn{i + 1}', b))
        cin = 4 * f
    return w


def linen_names(flat):
    """The blocks' submodules numbered per class, as vit_jax saves after `convert_pre_linen`."""
    names = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
             'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
    out = {}
    for k, v in flat.items():
        parts = k.split('/')
        if parts[0] == 'Transformer' and len(parts) > 2:
            parts[2] = names.get(parts[2], parts[2])
        out['/'.join(parts)] = v
    return out


def opt_target(flat):
    """An old vit_jax training state: the parameters under `opt/target/`, beside its moments."""
    return {**{'opt/target/' + k: v for k, v in flat.items()},
            'opt/state/step': np.array(1000, np.int32),
            **{'opt/state/param_states/' + k + '/grad_ema': np.zeros_like(v)
               for k, v in flat.items()}}


def big_vision(flat, scan=False):
    """big_vision's `params/` layout of the same function.

    Linen names; the position embedding is `params/pos_embedding` over the
    patches only, added before the class token is concatenated (so the class
    token's own row is folded into `cls`); with `scan`, the blocks stacked into
    `Transformer/encoderblock/...` on axis 0.
    """
    flat = linen_names(flat)
    posemb = flat.pop('Transformer/posembed_input/pos_embedding')
    if 'cls' in flat:
        flat['cls'] = flat['cls'] + posemb[:, :1]
        posemb = posemb[:, 1:]
    flat['pos_embedding'] = posemb
    if scan:
        blocks = sorted({int(k.split('/')[1].split('_')[1]) for k in flat
                         if k.startswith('Transformer/encoderblock_')})
        first = 'Transformer/encoderblock_0/'
        for k in [k for k in flat if k.startswith(first)]:
            rest = k[len(first):]
            flat['Transformer/encoderblock/' + rest] = np.stack(
                [flat.pop(f'Transformer/encoderblock_{i}/{rest}') for i in blocks])
    return {'params/' + k: v for k, v in flat.items()}


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
