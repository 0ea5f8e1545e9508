"""The benchmarks' own arithmetic."""
from benchmarks import common


def test_image_path_flops_is_vit_b16s_published_count_less_its_last_block():
  # ViT-B/16 at 224 is 17.6 G multiply-adds a forward pass (timm's published
  # GMACs of vit_base_patch16_224); the image path skips the last block's query, attention, output
  # projection and MLP.
  n, d, m = 197, 768, 3072
  skipped = n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * m
  forward = common.image_path_flops(common.VIT_B16) / 2 + skipped
  assert abs(forward / 17.6e9 - 1) < 0.01
