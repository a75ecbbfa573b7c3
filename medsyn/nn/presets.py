"""Named UNet size presets (DiT-style registry); keys are `UNet` constructor arguments.

Paper-scale presets and what they cost, counted on the meta device (`medsyn summary PRESET`):
- base-700m: ~712 M parameters, ~3 TFLOP per forward at 64^3 (MedSyn's released base: 716 M, 12.1 TFLOP,
  because it only downsamples in-plane). Downsampling is 3-D and the widest layers (1024) sit at 8^3,
  where all attention lives: 10 transformer blocks of self- and cross-attention over 512 voxel tokens.
- sr-light: ~65 M parameters, ~9.4 TFLOP per forward at 256^3 (MedSyn's SR: 54 M, 81.5 TFLOP); one
  attention block at the bottom, no text, and the low-resolution volume concatenated to the input.
"""

from __future__ import annotations

from typing import Any

# what every preset of a stage shares: the base model sees 4 channels and text, the SR model
# 4 noisy + 4 upsampled channels, a noise-augmentation level and no text
_BASE = {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "mid_attention": True, "pooled_text": True}
_SR = {
    "spatial_dims": 3,
    "in_channels": 8,
    "out_channels": 4,
    "mid_attention": True,
    "augment_embedding": True,
}
# the 2-D radiograph baseline (`train.py cxr-diffusion`): one channel, text as for the base model
_CXR = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "mid_attention": True, "pooled_text": True}

PRESETS: dict[str, dict[str, Any]] = {
    "base-700m": {
        **_BASE,
        "num_channels": [96, 192, 384, 1024],
        "num_res_blocks": [1, 2, 2, 2],
        "transformer_depth": 10,
        "num_head_channels": 64,
        "time_embed_dim": 1024,
        "cross_attention_dim": 768,
    },
    "sr-light": {
        **_SR,
        "num_channels": [24, 48, 96, 192, 384],
        "num_res_blocks": [1, 1, 2, 2, 1],
        "transformer_depth": 1,
        "num_head_channels": 64,
        "norm_num_groups": 8,
    },
    # The CPU demo: the same code at 32^3 -> 128^3 (text width of the demo's small BERT).
    "base-demo": {
        **_BASE,
        "num_channels": [16, 32, 64, 128],
        "num_res_blocks": [1, 1, 2, 2],
        "transformer_depth": 2,
        "num_head_channels": 32,
        "norm_num_groups": 8,
        "cross_attention_dim": 128,
    },
    "sr-demo": {
        **_SR,
        "num_channels": [16, 32, 64, 64],
        "num_res_blocks": [1, 1, 1, 1],
        "transformer_depth": 1,
        "num_head_channels": 32,
        "norm_num_groups": 8,
    },
    # Unit tests: a few thousand parameters, 8^3-16^3 inputs.
    "base-tiny": {
        **_BASE,
        "num_channels": [16, 32],
        "num_res_blocks": 1,
        "transformer_depth": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
    },
    "sr-tiny": {
        **_SR,
        "num_channels": [16, 32],
        "num_res_blocks": 1,
        "transformer_depth": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
    },
    # The radiograph baseline's CPU demo: base-demo's widths in 2-D, at 64^2 (8^2 at the bottom), with
    # cross-attention to the report at the two lowest levels (16^2, 8^2) and the bottleneck; ~1.6 GFLOP per
    # forward at 64^2. And its unit-test size (16^2-32^2).
    "cxr-demo": {
        **_CXR,
        "num_channels": [16, 32, 64, 128],
        "num_res_blocks": [1, 1, 2, 2],
        "attention_levels": [False, False, True, True],
        "transformer_depth": 1,
        "num_head_channels": 32,
        "norm_num_groups": 8,
        "cross_attention_dim": 128,
    },
    "cxr-tiny": {
        **_CXR,
        "num_channels": [16, 32],
        "num_res_blocks": 1,
        "attention_levels": [False, True],
        "transformer_depth": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
    },
}

# The input size each preset is meant for (used by `medsyn summary` when --size is not given).
DEFAULT_SIZE: dict[str, int] = {
    "base-700m": 64,
    "sr-light": 256,
    "base-demo": 32,
    "sr-demo": 128,
    "base-tiny": 16,
    "sr-tiny": 16,
    "cxr-demo": 64,
    "cxr-tiny": 16,
}
