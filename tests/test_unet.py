import pytest
import torch

from medsyn.nn.blocks import Attention, ResBlock
from medsyn.nn.unet import UNet


def _randomize(model: torch.nn.Module) -> None:
    """Zero-initialised output layers make a fresh UNet output exactly 0; perturb for real checks."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def tiny(**kw) -> UNet:
    args = dict(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        num_channels=(16, 32),
        num_res_blocks=1,
        num_head_channels=16,
        norm_num_groups=8,
        cross_attention_dim=8,
    )
    args.update(kw)
    return UNet(**args)


def test_fresh_unet_outputs_zero_and_has_gradients():
    model = tiny()
    x = torch.randn(2, 4, 8, 8, 8)
    out = model(x, torch.rand(2), torch.randn(2, 3, 8))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer
    out.sum().backward()
    assert model.conv_out.weight.grad is not None and model.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(8, 8, 8), (12, 16, 10), (7, 9, 5)])
def test_odd_and_anisotropic_shapes(shape):
    model = tiny(num_channels=(16, 32, 32))
    _randomize(model)
    out = model(torch.randn(1, 4, *shape), torch.rand(1), torch.randn(1, 3, 8))
    assert out.shape == (1, 4, *shape)


def test_two_dimensional_and_in_plane_downsampling():
    model2d = tiny(spatial_dims=2)
    assert model2d(torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 3, 8)).shape == (2, 4, 16, 16)
    inplane = tiny(downsample_factors=[(1, 2, 2)])
    _randomize(inplane)
    assert inplane(torch.randn(1, 4, 4, 8, 8), torch.rand(1), torch.randn(1, 3, 8)).shape == (1, 4, 4, 8, 8)


def test_output_depends_on_text_and_ignores_masked_tokens():
    model = tiny(pooled_text=True)
    _randomize(model)
    model.eval()
    x, t = torch.randn(1, 4, 8, 8, 8), torch.rand(1)
    ctx = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    base = model(x, t, ctx, mask)
    changed_masked = ctx.clone()
    changed_masked[:, 2:] += 10.0
    assert torch.allclose(model(x, t, changed_masked, mask), base, atol=1e-5)
    changed_real = ctx.clone()
    changed_real[:, 0] += 1.0
    assert not torch.allclose(model(x, t, changed_real, mask), base, atol=1e-4)


def test_fully_masked_context_is_finite_and_equals_no_cross_attention():
    attn = Attention(16, 2, context_dim=8)
    torch.nn.init.normal_(attn.to_out.weight)
    out = attn(torch.randn(2, 5, 16), torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.count_nonzero(out) == 0


def test_sr_concat_and_augmentation_level():
    model = tiny(in_channels=8, cross_attention_dim=None, augment_embedding=True)
    _randomize(model)
    x, low = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    out = model(x, torch.rand(1), concat=low, aug_t=torch.zeros(1))
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, torch.rand(1), concat=low, aug_t=torch.ones(1)))
    with pytest.raises(ValueError, match="8 input channels"):
        model(x, torch.rand(1))


def test_gradient_checkpointing_matches_plain_gradients():
    torch.manual_seed(0)
    plain = tiny()
    _randomize(plain)
    ckpt = tiny(use_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8, 8), torch.rand(2), torch.randn(2, 3, 8)
    plain(x, t, ctx).square().sum().backward()
    ckpt(x, t, ctx).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_scale_shifts_of_all_blocks_equal_each_blocks_own_projection():
    model = tiny(num_channels=(16, 32, 32), num_res_blocks=[1, 2, 1])
    _randomize(model)
    emb = torch.randn(2, model.time_embed.mlp[-1].out_features)
    shifts = model._scale_shifts(emb)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert list(shifts) == blocks and len(blocks) == 13  # 4 encoder, 2 middle, 7 decoder
    for block in blocks:
        torch.testing.assert_close(shifts[block], block.emb_proj(torch.nn.functional.silu(emb)))


def test_config_round_trip_rebuilds_the_same_architecture():
    model = tiny(num_res_blocks=[1, 2])
    clone = UNet(**model.config)
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())  # same parameter names and shapes


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"num_channels": (16, 30)}, "norm_num_groups"),
        ({"num_res_blocks": [1, 1, 1]}, "num_res_blocks"),
        ({"num_channels": (16, 24), "num_head_channels": 16}, "num_head_channels"),
        ({"pooled_text": True, "cross_attention_dim": None}, "pooled_text"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tiny(**kwargs)


def test_bf16_autocast_forward_on_cpu():
    model = tiny()
    _randomize(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 4, 8, 8, 8), torch.rand(1), torch.randn(1, 3, 8))
    assert torch.isfinite(out.float()).all()
