"""The medsyn UNet (MedSyn IV.B, IV.E): a pure-convolution encoder-decoder with all attention
(self-attention plus cross-attention to report tokens) at the bottleneck.

The network knows nothing about the noise schedule: it maps (x_t, t, condition) to an output
that a `medsyn.diffusion.Denoiser` interprets as x0, eps or v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medsyn.nn.blocks import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedder,
    Upsample,
    conv_nd,
    group_norm_silu,
    zero_module,
)


def _skip_block(block: ResBlock, h: torch.Tensor, skip: torch.Tensor, emb, scale_shift) -> torch.Tensor:
    # a decoder block on [h, skip] (B, C_h + C_skip, *S); under checkpointing the concatenation is
    # recomputed in backward instead of being kept next to the h and skip it copies
    return block(torch.cat([h, skip], dim=1), emb, scale_shift)


def _per_level(value, levels: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
        if len(value) != levels:
            raise ValueError(f"{name} must have one entry per level ({levels}), got {len(value)}: {value}")
        return value
    return [value] * levels


class UNet(nn.Module):
    """Text-conditioned diffusion UNet used by both stages (base 64^3 and super-resolution 256^3).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of x_t plus those of `concat` (SR: 4 noisy + 4 upsampled = 8).
        out_channels: channels predicted (4: ct, lobes, airway, vessels).
        num_channels: width per resolution level, highest resolution first.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more), int or per level.
        attention_levels: per level, whether encoder/decoder blocks there get attention (MedSyn: none).
        mid_attention: self/cross-attention transformer at the bottleneck.
        transformer_depth: transformer blocks in the bottleneck attention.
        num_head_channels: channels per attention head.
        cross_attention_dim: width of the text tokens (768 for BERT), or None for no text.
        downsample_factors: factor between consecutive levels, int or per step; each an int or a
            per-axis tuple such as (1, 2, 2) for in-plane downsampling.
        norm_num_groups: GroupNorm groups.
        dropout: dropout inside residual blocks.
        time_embed_dim: width of the timestep embedding (default 4 x num_channels[0]).
        pooled_text: add the masked mean of the text tokens to the timestep embedding.
        augment_embedding: embed a second time, the noise-augmentation level `aug_t` of `concat`.
        use_checkpointing: recompute each block in the backward pass to save activation memory.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 4,
        num_channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: bool | Sequence[bool] = False,
        mid_attention: bool = True,
        transformer_depth: int = 1,
        num_head_channels: int = 64,
        cross_attention_dim: int | None = None,
        downsample_factors: int | Sequence[int | Sequence[int]] = 2,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        time_embed_dim: int | None = None,
        pooled_text: bool = False,
        augment_embedding: bool = False,
        use_checkpointing: bool = False,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        # the constructor arguments, as plain values: saved with exported weights and in run configs
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        num_channels = [int(c) for c in num_channels]
        levels = len(num_channels)
        if levels < 1:
            raise ValueError("num_channels must name at least one level")
        for c in num_channels:
            if c % norm_num_groups:
                raise ValueError(
                    f"num_channels {num_channels} must be multiples of norm_num_groups={norm_num_groups}"
                )
            if (attention_levels or mid_attention) and c % num_head_channels and c == num_channels[-1]:
                raise ValueError(
                    f"num_channels[-1]={c} must be a multiple of num_head_channels={num_head_channels}"
                )
        if pooled_text and cross_attention_dim is None:
            raise ValueError("pooled_text needs cross_attention_dim (the text token width)")
        num_res_blocks = [int(n) for n in _per_level(num_res_blocks, levels, "num_res_blocks")]
        if any(n < 1 for n in num_res_blocks):
            raise ValueError(f"num_res_blocks must be >= 1 per level, got {num_res_blocks}")
        attention_levels = [bool(a) for a in _per_level(attention_levels, levels, "attention_levels")]
        factors = _per_level(downsample_factors, levels - 1, "downsample_factors") if levels > 1 else []
        factors = [
            tuple(int(f) for f in _per_level(f, spatial_dims, "downsample_factors entry")) for f in factors
        ]

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_channels = num_channels
        self.cross_attention_dim = cross_attention_dim
        self.use_checkpointing = use_checkpointing
        self.downsample_factors = factors

        embed_dim = time_embed_dim or 4 * num_channels[0]
        frequency_dim = min(num_channels[0], 256)
        self.time_embed = TimestepEmbedder(frequency_dim, embed_dim)
        self.aug_embed = TimestepEmbedder(frequency_dim, embed_dim) if augment_embedding else None
        self.text_pool = nn.Linear(cross_attention_dim, embed_dim) if pooled_text else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, cout, embed_dim, norm_num_groups, dropout)

        def attn(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(
                spatial_dims, ch, ch // num_head_channels, depth, cross_attention_dim, norm_num_groups
            )

        self.conv_in = conv_nd(spatial_dims, in_channels, num_channels[0], 3, padding=1)
        # Encoder: per level, residual blocks (each optionally with attention), then a downsample.
        self.down = nn.ModuleList()
        skip_channels = [num_channels[0]]
        ch = num_channels[0]
        for level, width in enumerate(num_channels):
            stage = nn.ModuleDict({"blocks": nn.ModuleList(), "attns": nn.ModuleList()})
            for _ in range(num_res_blocks[level]):
                stage["blocks"].append(res(ch, width))
                stage["attns"].append(attn(width, 1) if attention_levels[level] else nn.Identity())
                ch = width
                skip_channels.append(ch)
            if level < levels - 1:
                stage["downsample"] = Downsample(spatial_dims, ch, ch, factors[level])
                skip_channels.append(ch)
            self.down.append(stage)

        self.mid_block1 = res(ch, ch)
        self.mid_attn = attn(ch, transformer_depth) if mid_attention else None
        self.mid_block2 = res(ch, ch)

        # Decoder: per level (lowest first), one more residual block than the encoder, each taking a
        # skip; then an upsample that also narrows to the next level's width.
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            width = num_channels[level]
            stage = nn.ModuleDict({"blocks": nn.ModuleList(), "attns": nn.ModuleList()})
            for _ in range(num_res_blocks[level] + 1):
                stage["blocks"].append(res(ch + skip_channels.pop(), width))
                stage["attns"].append(attn(width, 1) if attention_levels[level] else nn.Identity())
                ch = width
            if level > 0:
                stage["upsample"] = Upsample(spatial_dims, ch, num_channels[level - 1], factors[level - 1])
                ch = num_channels[level - 1]
            self.up.append(stage)

        self.norm_out = nn.GroupNorm(norm_num_groups, ch, eps=1e-6)
        self.conv_out = zero_module(conv_nd(spatial_dims, ch, out_channels, 3, padding=1))

    def _run(self, fn: Callable, *args):
        if self.use_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _attend(self, module: nn.Module, h, context, context_mask):
        if isinstance(module, nn.Identity):
            return h
        return self._run(module, h, context, context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        aug_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target.

        x: (B, C_x, *S) noisy volume; t: (B,) time in [0, 1];
        context: (B, L, cross_attention_dim) text tokens; context_mask: (B, L) bool, True = real token;
        concat: (B, C_c, *S) volume concatenated to x (SR: the upsampled low-resolution volume),
        with C_x + C_c = in_channels; aug_t: (B,) noise-augmentation level of `concat`.
        Returns (B, out_channels, *S).
        """
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channels, got {x.shape[1]}")
        emb = self.time_embed(t.reshape(-1).expand(x.shape[0]))
        if self.aug_embed is not None:
            aug_t = torch.zeros_like(t) if aug_t is None else aug_t
            emb = emb + self.aug_embed(aug_t.reshape(-1).expand(x.shape[0]))
        if self.cross_attention_dim is None:
            context = context_mask = None
        elif context is not None:
            context = context.to(emb.dtype)
            if self.text_pool is not None:
                weights = (
                    torch.ones(context.shape[:2], device=context.device, dtype=context.dtype)
                    if context_mask is None
                    else context_mask.to(context.dtype)
                )
                pooled = (context * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
                emb = emb + self.text_pool(pooled)

        scale_shift = self._scale_shifts(emb)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block, attn in zip(stage["blocks"], stage["attns"], strict=True):
                h = self._attend(attn, self._run(block, h, emb, scale_shift[block]), context, context_mask)
                skips.append(h)
            if "downsample" in stage:
                h = self._run(stage["downsample"], h)
                skips.append(h)

        h = self._run(self.mid_block1, h, emb, scale_shift[self.mid_block1])
        if self.mid_attn is not None:
            h = self._run(self.mid_attn, h, context, context_mask)
        h = self._run(self.mid_block2, h, emb, scale_shift[self.mid_block2])

        for stage in self.up:
            for block, attn in zip(stage["blocks"], stage["attns"], strict=True):
                h = self._run(_skip_block, block, h, skips.pop(), emb, scale_shift[block])
                h = self._attend(attn, h, context, context_mask)
            if "upsample" in stage:
                h = stage["upsample"](h, size=skips[-1].shape[2:])
        return self.conv_out(group_norm_silu(h, self.norm_out))

    def _scale_shifts(self, emb: torch.Tensor) -> dict[ResBlock, torch.Tensor]:
        """Every residual block's emb_proj(silu(emb)), (B, 2 * C_out), from one matrix product.

        The same values as each block's own projection; one product instead of one small one per
        block (and three per block in backward), each of which costs a kernel launch on GPU and a
        thread synchronisation on CPU.
        """
        blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        weight = torch.cat([b.emb_proj.weight for b in blocks])  # (sum of 2 * C_out, E)
        bias = torch.cat([b.emb_proj.bias for b in blocks])
        out = F.linear(F.silu(emb), weight, bias)  # (B, sum of 2 * C_out)
        return dict(zip(blocks, out.split([b.emb_proj.out_features for b in blocks], dim=1), strict=True))
