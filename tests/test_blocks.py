"""UNet building blocks: zero initialisation, time features, residual blocks, resampling, attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsyn.nn import blocks
from medsyn.nn.blocks import (
    Attention,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    group_norm_silu,
    timestep_embedding,
    zero_module,
)


def perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter: zero-initialised output layers would make most checks trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def test_zero_module_zeroes_every_parameter():
    conv = nn.Conv3d(4, 8, 3)
    assert zero_module(conv) is conv
    assert all(torch.count_nonzero(p) == 0 for p in conv.parameters())
    assert torch.count_nonzero(conv(torch.randn(1, 4, 5, 5, 5))) == 0


@pytest.mark.parametrize("dim", [16, 17])
def test_timestep_embedding(dim):
    t = torch.tensor([0.0, 0.5, 0.501, 1.0])
    emb = timestep_embedding(t, dim)  # (4, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0, : dim // 2], torch.ones(dim // 2))  # cos(0) = 1
    distances = torch.cdist(emb, emb)  # (4, 4)
    assert distances[~torch.eye(4, dtype=torch.bool)].min() > 1e-2  # every t, even 0.5 and 0.501, differs
    if dim % 2:
        assert torch.count_nonzero(emb[:, -1]) == 0  # odd width: a zero column pads it


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_resblock_is_its_skip_at_init(spatial_dims):
    x = torch.randn(2, 8, *[6] * spatial_dims)
    emb = torch.randn(2, 12)
    same = ResBlock(spatial_dims, 8, 8, embed_dim=12, norm_num_groups=4)
    assert torch.equal(same(x, emb), x)  # zero-initialised conv2: the residual branch adds exactly 0
    wider = ResBlock(spatial_dims, 8, 16, embed_dim=12, norm_num_groups=4)
    out = wider(x, emb)
    assert out.shape == (2, 16, *[6] * spatial_dims)
    torch.testing.assert_close(out, wider.skip(x))  # the 1x1 skip runs as a matrix product: float rounding
    perturb(same)
    out = same(x, emb)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert not torch.allclose(out, same(x, emb.flip(0)))  # the time embedding reaches the output


@pytest.mark.parametrize("split", [False, True], ids=["native", "split-stats"])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 5, 6, 7), (3, 8, 6, 5), (2, 8, 9)])
def test_group_norm_silu_matches_the_three_steps(shape, modulated, split, monkeypatch):
    # split-stats: the path CUDA takes for few (sample, group) rows, forced here on the CPU
    monkeypatch.setattr(blocks, "split_statistics", lambda x, rows: split)
    norm = perturb(nn.GroupNorm(4, 8, eps=1e-6)).double()
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    scale = torch.randn(shape[0], 8, dtype=torch.double, requires_grad=True) if modulated else None
    shift = torch.randn(shape[0], 8, dtype=torch.double, requires_grad=True) if modulated else None

    def reference(x, scale, shift):
        h = norm(x)
        if scale is not None:
            tail = (1,) * (x.ndim - 2)
            h = h * (1 + scale.view(*scale.shape, *tail)) + shift.view(*shift.shape, *tail)
        return F.silu(h)

    out = group_norm_silu(x, norm, scale, shift)  # (B, C, *S)
    torch.testing.assert_close(out, reference(x, scale, shift))
    inputs = [x, *norm.parameters(), *([scale, shift] if modulated else [])]
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad)
    expected = torch.autograd.grad(reference(x, scale, shift), inputs, grad)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)
    part = (slice(0, 1), slice(None), slice(0, 3))  # a non-contiguous slice of one sample
    if modulated:
        assert torch.autograd.gradcheck(
            lambda x, s, t: group_norm_silu(x, norm, s, t), (x[part], scale[:1], shift[:1])
        )
    else:
        assert torch.autograd.gradcheck(lambda x: group_norm_silu(x, norm), (x[part],))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_statistics_match_group_norm_far_from_zero_mean(dtype):
    # a mean 300 standard deviations from zero: float64 sums keep the variance exact where float32
    # sums of squares would cancel; what is left is float32's rounding of x * scale + shift, which the
    # native kernel has too
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 12, 4000, generator=g) + 300.0).to(dtype)
    weight, bias = torch.randn(12, generator=g), torch.randn(12, generator=g)
    expected = F.group_norm(x.double(), 3, weight.double(), bias.double(), 1e-6)
    out = blocks.group_norm_split(x, 3, weight, bias, 1e-6, torch.float32)
    native = F.group_norm(x.float(), 3, weight, bias, 1e-6)
    assert out.dtype == torch.float32 and out.shape == x.shape
    error = (out.double() - expected).abs().max()
    assert error < 2 * (native.double() - expected).abs().max() and error < 1e-4


def test_group_norm_silu_keeps_only_its_input_for_backward():
    norm = nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 6, 6, 6, requires_grad=True)
    scale, shift = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        group_norm_silu(x * 1, norm, scale, shift)
    assert sum(t.numel() for t in saved if t.numel() >= x.numel()) == x.numel()  # x, not y or silu(y)


@pytest.mark.parametrize("channels", [(8, 8), (8, 16)])
def test_resblock_matches_its_unfused_definition(channels):
    block = perturb(ResBlock(3, *channels, embed_dim=12, norm_num_groups=4))
    x, emb = torch.randn(2, channels[0], 5, 4, 6), torch.randn(2, 12)
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.emb_proj(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
    h = block.conv2(F.silu(block.norm2(h) * (1 + scale) + shift))
    torch.testing.assert_close(block(x, emb), block.skip(x) + h)


def test_resblock_takes_a_precomputed_scale_and_shift():
    block = perturb(ResBlock(3, 8, 16, embed_dim=12, norm_num_groups=4))
    x, emb = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 12)
    given = block(x, emb, block.emb_proj(F.silu(emb)))
    torch.testing.assert_close(given, block(x, emb))
    assert not torch.allclose(block(x, emb, torch.zeros(2, 32)), given)


@pytest.mark.parametrize(
    ("factor", "size", "down"),
    [((1, 2, 2), (4, 8, 8), (4, 4, 4)), ((2, 2, 2), (8, 8, 8), (4, 4, 4)), ((2, 2, 2), (9, 5, 8), (5, 3, 4))],
)
def test_downsample_and_upsample_shapes(factor, size, down):
    x = torch.randn(1, 4, *size)
    h = Downsample(3, 4, 8, factor)(x)
    assert h.shape == (1, 8, *down)  # ceil(n / f) per axis
    up = Upsample(3, 8, 4, factor)
    assert up(h).shape == (1, 4, *(d * f for d, f in zip(down, factor, strict=True)))
    assert up(h, size=size).shape == x.shape  # odd sizes: cropped back to the skip's size


def test_downsample_and_upsample_in_2d():
    x = torch.randn(1, 4, 8, 6)
    h = Downsample(2, 4, 8, (2, 1))(x)
    assert h.shape == (1, 8, 4, 6) and Upsample(2, 8, 4, (2, 1))(h).shape == x.shape


def test_attention_ignores_masked_tokens():
    attn = perturb(Attention(16, num_heads=2, context_dim=8))
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = attn(x, context, mask)  # (2, 5, 16)
    changed = context.clone()
    changed[0, 2], changed[1, 1:] = 10.0, -10.0  # only masked tokens
    assert out.shape == (2, 5, 16) and torch.allclose(attn(x, changed, mask), out, atol=1e-6)
    changed[0, 1] = 10.0  # a token that is attended to
    assert not torch.allclose(attn(x, changed, mask)[0], out[0], atol=1e-3)
    nothing = attn(x, context, torch.tensor([[False] * 3, [True] * 3]))
    assert torch.count_nonzero(nothing[0]) == 0 and torch.count_nonzero(nothing[1]) > 0  # no token: no update


def test_attention_rejects_indivisible_width():
    with pytest.raises(ValueError, match="num_heads=3"):
        Attention(16, num_heads=3)


def test_spatial_transformer():
    x, context = torch.randn(2, 16, 4, 4, 4), torch.randn(2, 3, 8)
    block = SpatialTransformer(3, 16, num_heads=2, depth=2, context_dim=8, norm_num_groups=8)
    assert torch.equal(block(x, context), x)  # zero-initialised proj_out: the identity at init
    perturb(block)
    out = block(x, context)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert not torch.allclose(block(x, context.flip(0)), out)  # the context reaches the output
