"""Sliding-window SR denoising: blending as MONAI's sliding window does, close to the full forward, one
window at a time, blending precision in float16, the weight map, one window, window sizes."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

import medsyn
from medsyn.generation.windowed import (
    MIN_WEIGHT,
    gaussian_weights,
    unet_multiple,
    window_size,
    window_slices,
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


def random_unet() -> torch.nn.Module:
    """sr-tiny (one 2x downsampling) with its zero-initialized layers drawn at random, so that its output
    depends on its input and reaches beyond a window's edge (receptive field, GroupNorm per window)."""
    net = medsyn.build_model("sr-tiny").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


def test_blends_as_monai_sliding_window_inference():
    x, t, cond = volumes()  # 24^3, 16^3 windows: 8 windows over each sample
    net = random_unet()
    out = windowed_denoiser(StandIn(net), cond, window=16, overlap=0.25)(x, t)

    def predictor(patch):  # (1, 4 + 4, *roi) -> (1, 4, *roi)
        return net(patch[:, :4], t[:1], concat=patch[:, 4:], aug_t=cond["aug_t"][:1])

    with torch.no_grad():  # the previous implementation: (x, concat) concatenated for the whole volume
        inputs = torch.cat([x, cond["concat"]], dim=1)
        monai = sliding_window_inference(
            inputs, (16, 16, 16), 1, predictor, overlap=0.25, roi_weight_map=gaussian_weights((16, 16, 16))
        )
    assert out.shape == x.shape and out.abs().max() > 1.0  # not a trivial output
    torch.testing.assert_close(out, monai, atol=2e-5, rtol=0)  # the same sums, added in another order


@pytest.mark.parametrize(("size", "window", "overlap"), [(24, 16, 0.25), (24, 8, 0.5), (28, 16, 0.2)])
def test_local_network_is_the_full_forward_within_blending(size, window, overlap):
    x, t, cond = volumes(size)
    stand_in = StandIn(LocalNet())
    out = windowed_denoiser(stand_in, cond, window, overlap)(x, t)
    full = stand_in(x, t, concat=cond["concat"], aug_t=cond["aug_t"])
    diff = (out - full).abs()
    # Only a window's edge voxels see its zero padding, and its Gaussian weight makes them count little next
    # to the window whose centre is nearer. Measured: max 0.004, 0.010, 0.036 std; mean <= 1e-3 std. Without
    # the weights (a mean of windows) max 1.4 std; with the former floor of 1e-8, 0.17 std at overlap 0.2.
    assert diff.max() < 0.05 * full.std() and diff.mean() < 2e-3 * full.std(), (diff.max(), diff.mean())


class Recorder(StandIn):
    """A stand-in that records the shapes of the (x, concat) it is called with."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__(net)
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, x, t, concat=None, aug_t=None):
        self.shapes.append((tuple(x.shape), tuple(concat.shape)))
        return super().__call__(x, t, concat=concat, aug_t=aug_t)


def test_the_network_sees_one_window_at_a_time():
    x, t, cond = volumes()
    recorder = Recorder(LocalNet())
    windowed_denoiser(recorder, cond, window=(8, 16, 24), overlap=0.5)(x, t)
    # starts 0, 4, .., 16 on the first axis; 0 and 8 on the second; 0 on the third (the whole axis)
    assert len(window_slices((24, 24, 24), (8, 16, 24), 0.5)) == 5 * 2 * 1
    assert recorder.shapes == [((2, 4, 8, 16, 24), (2, 4, 8, 16, 24))] * 10


def test_windows_lie_on_monai_grid():
    slices = window_slices((24, 20, 7), (16, 8, 7), 0.25)
    starts = sorted(tuple(s.start for s in w) for w in slices)
    assert starts == [(a, b, 0) for a in (0, 8) for b in (0, 6, 12)]  # steps 12 and 6, the last at the end
    assert all(tuple(s.stop - s.start for s in w) == (16, 8, 7) for w in slices)


def test_times_may_differ_per_sample():
    x, _, cond = volumes()
    cond["aug_t"] = torch.tensor([0.1, 0.3])
    t = torch.tensor([0.2, 0.7])
    net = random_unet()
    both = windowed_denoiser(StandIn(net), cond, window=16)(x, t)
    second = windowed_denoiser(StandIn(net), {k: v[1:] for k, v in cond.items()}, window=16)(x[1:], t[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)
    swapped = windowed_denoiser(StandIn(net), cond, window=16)(x, t.flip(0))
    assert not torch.allclose(both[0], swapped[0], atol=1e-3)  # each sample's own time reaches its windows


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
def test_weights_are_positive_and_not_flattened(roi):
    w = gaussian_weights(roi)
    assert w.shape == roi and w.dtype == torch.float32 and w.max() == 1.0
    assert w.min() >= MIN_WEIGHT and w.min() < 1e-9  # positive, and Gaussian down to the corners (~4e-11)
    assert w.min() == w[0, 0, 0] and int((w == w.min()).sum()) == 8  # no floor flattens the tails
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
