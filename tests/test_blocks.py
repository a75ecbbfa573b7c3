"""UNet building blocks: zero initialisation, time features, residual blocks, resampling, attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsyn.nn.blocks import (
    Attention,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
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
    assert out.shape == (2, 16, *[6] * spatial_dims) and torch.equal(out, wider.skip(x))
    perturb(same)
    out = same(x, emb)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert not torch.allclose(out, same(x, emb.flip(0)))  # the time embedding reaches the output


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
