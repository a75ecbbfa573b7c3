"""Building blocks of the medsyn UNet: residual conv blocks, resampling, attention.

Dimension-agnostic: every block takes `spatial_dims` (2 or 3) and works on (B, C, *spatial).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """Conv1d/2d/3d by `spatial_dims`."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity (DiT, ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of continuous time t in [0, 1] (scaled by 1000 as for discrete steps).

    t: (B,) -> (B, dim)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP."""

    def __init__(self, frequency_dim: int, embed_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, embed_dim)
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


# Below this many (sample, group) rows, a CUDA GroupNorm takes its statistics by split reductions: the
# native kernel gives each row to one thread block, so the SR model's 8 groups of a 256^3 volume (50 M
# values each) kept 8 of 132 SMs busy and took 70% of a forward pass on an H100 (benchmarks/gpu.py).
SPLIT_STATS_ROWS = 32


def split_statistics(x: torch.Tensor, rows: int) -> bool:
    """Whether a group norm of `x` in `rows` (sample, group) rows takes the split-reduction path."""
    return x.is_cuda and rows < SPLIT_STATS_ROWS


def group_norm_split(
    flat: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """group_norm of `flat` (1, R, N) in `groups` groups with per-row `weight`, `bias` (R,), as `dtype`.

    The statistics come from a sum and a sum of squares accumulated in float64 (two reductions over the
    input in its own dtype, parallel within a row, no temporary of the input's size), the normalization
    from one multiply-add per value with per-row factors: the same values as F.group_norm within float
    rounding.
    """
    _, rows, n = flat.shape
    grouped = flat.reshape(groups, -1)
    count = grouped.shape[1]
    total = grouped.sum(dim=1, dtype=torch.float64)
    squares = torch.linalg.vector_norm(grouped, dim=1, dtype=torch.float64).square()
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0.0)
    rstd = (var + eps).rsqrt()
    per_group = rows // groups
    scale = rstd.repeat_interleave(per_group) * weight.double()  # (R,): y = x * scale + shift
    shift = bias.double() - mean.repeat_interleave(per_group) * scale
    return torch.addcmul(shift.to(dtype)[:, None], flat[0], scale.to(dtype)[:, None]).view(1, rows, n)


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x) * weight + bias) with a weight and bias per sample and channel.

    Saves only x for backward and recomputes the normalized tensor there: one pass over x instead of
    keeping one or two more activations of x's size (the normalized and the modulated tensor).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        # x: (B, C, *S); weight, bias: (B, C). The B samples' groups are the B * groups groups of one
        # (1, B * C, N) sample, which makes the affine step of group_norm a per-sample modulation.
        b, c = x.shape[:2]
        flat = x.reshape(1, b * c, -1)  # (1, B * C, N)
        if split_statistics(x, b * groups):
            # CUDA autocast runs group_norm in float32; so does this
            dtype = torch.float32 if torch.is_autocast_enabled("cuda") else x.dtype
            y = group_norm_split(flat, b * groups, weight.reshape(-1), bias.reshape(-1), eps, dtype)
        else:
            # F.group_norm, not its aten kernel, so autocast and any override of F apply as for nn.GroupNorm
            y = F.group_norm(flat, b * groups, weight.reshape(-1), bias.reshape(-1), eps)
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps, ctx.dtype = groups, eps, y.dtype
        return F.silu(y, inplace=True).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        b, c = x.shape[:2]
        # the forward's dtypes: x as group_norm saw it (autocast may have cast it), weights as given
        flat = x.reshape(1, b * c, -1).to(ctx.dtype).contiguous()
        n, groups = flat.shape[2], b * ctx.groups
        w = weight.reshape(-1)
        y, mean, rstd = torch.ops.aten.native_group_norm(
            flat, w, bias.reshape(-1), 1, b * c, n, groups, ctx.eps
        )
        grad_y = torch.ops.aten.silu_backward(grad.reshape(y.shape).to(y.dtype), y)
        del y
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            grad_y, flat, mean, rstd, w, 1, b * c, n, groups, mask
        )
        return (
            None if dx is None else dx.view(x.shape).to(x.dtype),
            None if dw is None else dw.view(weight.shape).to(weight.dtype),
            None if db is None else db.view(bias.shape).to(bias.dtype),
            None,
            None,
        )


def group_norm_silu(
    x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(norm(x) * (1 + scale) + shift), with the scale and shift folded into the norm's affine step.

    The same values as the three steps, within float rounding, at the activation memory of one:
    only x is kept for backward. `norm` is an affine nn.GroupNorm (its weight and bias are used).
    x: (B, C, *S); scale, shift: (B, C) or None -> (B, C, *S)
    """
    b, c = x.shape[:2]
    if scale is None:
        weight, bias = norm.weight.expand(b, c), norm.bias.expand(b, c)
    else:
        weight = norm.weight * (1 + scale)  # (B, C)
        bias = norm.bias * (1 + scale) + shift
    return _GroupNormSiLU.apply(x, weight, bias, norm.num_groups, norm.eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding as a scale and shift of the second norm."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else conv_nd(spatial_dims, in_channels, out_channels, 1)
        )

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, scale_shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, C_in, *S), emb: (B, E) -> (B, C_out, *S). scale_shift: (B, 2 * C_out), this block's
        # emb_proj(silu(emb)) when the caller computed it (the UNet does all blocks' in one product)
        if scale_shift is None:
            scale_shift = self.emb_proj(F.silu(emb))
        h = self.conv1(group_norm_silu(x, self.norm1))
        scale, shift = scale_shift.chunk(2, dim=1)  # (B, C_out) each
        h = self.dropout(group_norm_silu(h, self.norm2, scale, shift))
        if isinstance(self.skip, nn.Identity):
            # conv2's output is not saved for backward, so the residual is added in place
            return self.conv2(h).add_(x)
        # The 1x1 skip convolution as a batched matrix product added to conv2's output, its bias
        # folded into conv2's: oneDNN runs 1x1 convolutions far below its 3x3 speed.
        h = self.conv2._conv_forward(h, self.conv2.weight, self.conv2.bias + self.skip.bias)
        weight = self.skip.weight.flatten(1).expand(x.shape[0], -1, -1)  # (B, C_out, C_in)
        return torch.baddbmm(h.flatten(2), weight, x.flatten(2)).view(h.shape)


class Downsample(nn.Module):
    """Strided 3x3 convolution; `factor` per spatial axis (e.g. (1, 2, 2) for in-plane only)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, factor: Sequence[int]):
        super().__init__()
        self.factor = tuple(factor)
        kernel = tuple(3 if f > 1 else 1 for f in self.factor)
        padding = tuple(1 if f > 1 else 0 for f in self.factor)
        self.conv = conv_nd(
            spatial_dims, in_channels, out_channels, kernel, stride=self.factor, padding=padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Transposed convolution with kernel = stride = `factor` (as in nnU-Net).

    Each coarse voxel emits its own learned block of fine voxels, at the cost of a 1x1 convolution
    at the fine resolution; much cheaper than interpolating first and convolving 3x3 after.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, factor: Sequence[int]):
        super().__init__()
        self.factor = tuple(int(f) for f in factor)
        transpose = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
        self.conv = transpose(in_channels, out_channels, self.factor, stride=self.factor)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = self.conv(x)
        if size is not None and tuple(x.shape[2:]) != tuple(size):
            # odd sizes: the encoder rounded up (ceil(n / f)), so cropping restores the skip's size
            x = x[(..., *(slice(0, s) for s in size))]
        return x


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention from `dim` queries to `context_dim` keys/values."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = zero_module(nn.Linear(dim, dim))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, N, dim); context: (B, L, context_dim); mask: (B, L) bool, True = attend
        context = x if context is None else context
        b, n, d = x.shape
        h = self.num_heads
        q = self.to_q(x).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, d/h)
        k, v = self.to_kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn_mask = None
        keep = None
        if mask is not None:
            mask = mask.bool()
            keep = mask.any(dim=1)  # rows with no valid token contribute nothing
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.to_out(out.transpose(1, 2).reshape(b, n, d))
        if keep is not None:
            out = out * keep[:, None, None].to(out.dtype)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, optional cross-attention to text tokens, and a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.cross_attn = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), zero_module(nn.Linear(hidden, dim)))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, N, dim)
        x = x + self.self_attn(self.norm1(x))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.mlp(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Attention over the voxels of a feature map: GroupNorm, project in, transformer blocks, project out."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_heads: int,
        depth: int = 1,
        context_dim: int | None = None,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, C, *S) -> tokens (B, N, C) -> (B, C, *S)
        b, c, *spatial = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.blocks:
            h = block(h, context, context_mask)
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, *spatial)
        return x + h
