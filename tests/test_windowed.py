"""Sliding-window SR denoising: blending precision in float16, the weight map, one window, window sizes."""

from __future__ import annotations

import pytest
import torch

from medsyn.generation.windowed import (
    MIN_WEIGHT,
    gaussian_weights,
    unet_multiple,
    window_size,
    windowed_denoiser,
)


class LocalNet(torch.nn.Module):
    """A convolution-only SR stand-in (receptive field 3): computes in float32, returns `out_dtype`
    (default: the input's dtype), like a network run under half precision."""

    out_channels, downsample_factors = 4, []

    def __init__(self, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(8, 4, 3, padding=1)
        self.out_dtype = out_dtype

    def forward(self, x, t, concat=None, aug_t=None):  # (B, 4, *S), (B, 4, *S) -> (B, 4, *S)
        out = torch.tanh(self.conv(torch.cat([x, concat], dim=1).float()))
        return out.to(self.out_dtype or x.dtype)


class StandIn:
    """The part of `Denoiser` that `windowed_denoiser` uses: `.net` and `denoiser(x, t, concat=, aug_t=)`."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, x, t, concat=None, aug_t=None):
        return self.net(x, t, concat=concat, aug_t=aug_t)


def volumes(size: int = 24) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A state x (2, 4, *S), times t (2,) and the SR condition {"concat": (2, 4, *S), "aug_t": (2,)}."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, size, generator=g)
    concat = torch.randn(2, 4, size, size, size, generator=g)
    return x, torch.full((2,), 0.5), {"concat": concat, "aug_t": torch.full((2,), 0.1)}


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """The float32 windowed result on `volumes()`: 16^3 windows over 24^3, (2, 4, 24, 24, 24)."""
    x, t, cond = volumes()
    return windowed_denoiser(StandIn(LocalNet()), cond, window=16)(x, t)


@pytest.mark.parametrize(
    ("state", "net_out"), [(torch.float16, torch.float16), (torch.float32, torch.float16)]
)
def test_half_precision_blends_like_float32(state, net_out, reference):
    x, t, cond = volumes()  # 24^3 volume, 16^3 windows: the volume's corners are seen by window corners only
    half = windowed_denoiser(StandIn(LocalNet(net_out)), cond, window=16)(x.to(state), t)
    assert half.dtype == state and torch.isfinite(half).all()
    # float16 rounds inputs and outputs (~5e-4 relative); a zeroed edge weight would be off by ~|output|
    torch.testing.assert_close(half.float(), reference, atol=5e-3, rtol=0)


@pytest.mark.parametrize("roi", [(16, 16, 16), (8, 32, 64)])
def test_weights_are_positive_and_floored(roi):
    w = gaussian_weights(roi)
    assert w.shape == roi and w.dtype == torch.float32 and w.max() == 1.0
    assert w.min() > 0 and w.min() >= MIN_WEIGHT * (1 - 1e-6)  # the floor holds at the corners
    assert torch.tensor(w.min().item(), dtype=torch.float16) == 0  # why blending must not run in float16
    centre = tuple(n // 2 for n in roi)
    assert w[centre] > 0.9


@pytest.mark.parametrize("window", [16, 64])
def test_window_covering_the_volume_is_the_full_forward(window):
    x, t, cond = volumes(16)
    stand_in = StandIn(LocalNet())
    out = windowed_denoiser(stand_in, cond, window=window)(x, t)  # 64 is clipped to the volume
    assert torch.equal(out, stand_in(x, t, concat=cond["concat"], aug_t=cond["aug_t"]))


def test_window_size_must_divide_by_the_downsampling():
    assert window_size(16, (24, 24, 24), multiple=8) == (16, 16, 16)
    assert window_size((8, 32, 64), (16, 20, 24), multiple=4) == (8, 20, 24)  # the whole axis is allowed
    with pytest.raises(ValueError, match="multiple of 8"):
        window_size(12, (24, 24, 24), multiple=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        window_size(4, (24, 24, 24), multiple=8)
    with pytest.raises(ValueError, match="3-D volume"):
        window_size((16, 16), (24, 24, 24))


def test_unet_multiple_is_the_product_of_largest_factors():
    net = torch.nn.Module()
    net.downsample_factors = [2, (1, 2, 2), 2]
    assert unet_multiple(net) == 8 and unet_multiple(LocalNet()) == 1
