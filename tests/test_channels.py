"""Channel encodings: natural units <-> the diffusion range [-1, 1], for numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsyn.data.channels import (
    CHANNELS,
    HU_MAX,
    HU_MIN,
    LOBE_BITS,
    LOBE_LEVELS,
    decode_binary,
    decode_channel,
    decode_ct,
    decode_lobe_bits,
    decode_lobes,
    decode_volume,
    downsample,
    encode_binary,
    encode_channel,
    encode_ct,
    encode_lobe_bits,
    encode_lobes,
    encode_volume,
    from_net,
    net_channels,
    to_net,
)
from medsyn.data.lobes import LEFT_LOBES, RIGHT_LOBES
from medsyn.data.phantom import generate_phantom


def natural(shape: tuple[int, ...] = (6, 7, 8), seed: int = 0) -> dict[str, np.ndarray]:
    """Random channels in natural units: HU beyond the window on both sides, all lobe labels, masks."""
    rng = np.random.default_rng(seed)
    return {
        "ct": rng.integers(-2000, 2000, shape).astype(np.int16),
        "lobes": rng.integers(0, 6, shape).astype(np.uint8),
        "airway": (rng.random(shape) < 0.3).astype(np.uint8),
        "vessels": (rng.random(shape) < 0.3).astype(np.uint8),
    }


def test_ct_window_maps_to_unit_range():
    hu = np.array([-3000.0, HU_MIN, -212.0, HU_MAX, 3000.0])
    np.testing.assert_allclose(encode_ct(hu), [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(decode_ct(encode_ct(hu)), np.clip(hu, HU_MIN, HU_MAX), atol=1e-9)
    assert decode_ct(np.array([1.5]))[0] == HU_MAX  # decoding clips too


def test_lobes_and_masks_round_trip_through_float16():
    labels = np.arange(6, dtype=np.uint8)
    encoded = encode_lobes(labels)
    assert encoded.min() == -1.0 and encoded.max() == 1.0
    np.testing.assert_array_equal(decode_lobes(encoded.astype(np.float16)), labels)  # the cache dtype
    half_gap = np.diff(np.sort(LOBE_LEVELS)).min() / 2  # 1/6: right upper, middle, lower are 1/3 apart
    for shift in (0.99 * half_gap, -0.99 * half_gap):  # the nearest label within half the smallest gap
        np.testing.assert_array_equal(decode_lobes(encoded + shift), labels)
    assert decode_lobes(np.float32(LOBE_LEVELS[3] + 1.01 * half_gap)) == 4  # beyond it, the next level's
    np.testing.assert_array_equal(decode_lobes(np.array([-1.5, 1.5])), [2, 5])  # out of range: the end levels
    mask = np.array([0, 1, 1, 0], np.uint8)
    np.testing.assert_array_equal(encode_binary(mask), [-1.0, 1.0, 1.0, -1.0])
    np.testing.assert_array_equal(decode_binary(encode_binary(mask).astype(np.float16) * 0.1), mask)


def test_a_lung_border_passes_only_through_its_own_lobes():
    levels = dict(enumerate(LOBE_LEVELS))
    for lung in (LEFT_LOBES, RIGHT_LOBES):
        for lobe in lung:  # levels between background (0) and a lobe's level belong to that lung
            between = [k for k, v in levels.items() if min(0, levels[lobe]) < v < max(0, levels[lobe])]
            assert set(between) <= set(lung), (lobe, between)
        others = [levels[k] for k in levels if k not in lung and k != 0]
        lo, hi = min(levels[k] for k in lung), max(levels[k] for k in lung)
        assert not any(lo < v < hi for v in others)  # a fissure passes through no lobe of the other lung


def test_lobe_bits_round_trip_and_decode_to_the_nearest_valid_code():
    labels = np.arange(6)
    bits = encode_lobe_bits(labels)
    assert bits.shape == (3, 6) and set(np.unique(bits)) == {-1.0, 1.0}
    assert len({tuple(c) for c in LOBE_BITS}) == 6  # six distinct codes
    np.testing.assert_array_equal(decode_lobe_bits(bits * 0.1), labels)  # the signs decide
    # codes 6 and 7 (+ - + and + + +) are no label: the nearest valid code by the channel values
    invalid = np.array([[0.9, 0.2], [-0.1, 0.9], [0.2, 0.8]], np.float32)  # (3 bits, 2 voxels)
    distances = ((invalid.T[:, None, :] - LOBE_BITS[None]) ** 2).sum(-1)  # (2, 6)
    np.testing.assert_array_equal(decode_lobe_bits(invalid), distances.argmin(1))
    batch = torch.from_numpy(np.stack([labels, labels[::-1]]))  # (B, n) -> bits on dim 1
    torch_bits = encode_lobe_bits(batch, dim=1)
    assert torch_bits.shape == (2, 3, 6)
    torch.testing.assert_close(decode_lobe_bits(torch_bits, dim=1), batch.float())


def test_bits_share_a_bit_between_the_lobes_of_a_fissure():
    for a, b in ((1, 2), (3, 5), (4, 5)):  # left oblique, right oblique (lower part), right horizontal
        assert (LOBE_BITS[a] != LOBE_BITS[b]).sum() == 1


@pytest.mark.parametrize("lobe_encoding", ["levels", "bits"])
def test_network_channels_round_trip(lobe_encoding):
    x = torch.from_numpy(encode_volume(natural((4, 5, 6))))[None]  # (1, 4, *S)
    net = to_net(x, lobe_encoding)
    names = net_channels(lobe_encoding)
    assert net.shape == (1, len(names), 4, 5, 6) and len(names) == (4 if lobe_encoding == "levels" else 6)
    torch.testing.assert_close(net[:, names.index("airway")], x[:, 2])
    torch.testing.assert_close(from_net(net, lobe_encoding), x)
    if lobe_encoding == "bits":
        labels = torch.from_numpy(natural((4, 5, 6))["lobes"]).float()
        torch.testing.assert_close(net[0, 1:4], encode_lobe_bits(labels))
        only_lobes = to_net(x[:, [1]], lobe_encoding, names=["lobes"])  # a subset of the channels
        torch.testing.assert_close(only_lobes, net[:, 1:4])
        noisy = net * torch.rand(net.shape, generator=torch.Generator().manual_seed(0))  # signs kept
        np.testing.assert_array_equal(decode_lobes(from_net(noisy, "bits")[0, 1]), labels)
    volume = x[0].numpy()  # numpy, channels first
    assert np.array_equal(from_net(to_net(volume, lobe_encoding, dim=0), lobe_encoding, dim=0), volume)


def test_downsample_averages_blocks_and_takes_the_lobe_majority():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 8, 8, 4)).astype(np.float32)
    labels = np.zeros((8, 8, 4), np.uint8)
    labels[:3] = 4  # block x 0 on axis 0: 3 of 4 planes right middle
    labels[4:5] = 1  # block x 1: one plane of left upper, three of background
    labels[6:, :2] = 2  # ... except at y < 2, where two planes are left lower: a tie with background
    x[1] = encode_lobes(labels)
    lr = downsample(x, 4)
    assert lr.shape == (4, 2, 2, 1) and lr.dtype == np.float32
    means = x[[0, 2, 3]].reshape(3, 2, 4, 2, 4, 1, 4).mean((2, 4, 6))  # (C, 2, 2, 1) means of 4^3 blocks
    np.testing.assert_allclose(lr[[0, 2, 3]], means, rtol=1e-6)
    np.testing.assert_array_equal(decode_lobes(lr[1])[..., 0], [[4, 4], [0, 0]])  # ties: the lower label
    np.testing.assert_array_equal(downsample(x[[2, 1]], 4, ["airway", "lobes"]), lr[[2, 1]])  # by name
    with pytest.raises(ValueError, match="divisible"):
        downsample(x[:, :6], 4)


def test_a_thin_line_becomes_a_partial_value_not_an_aliased_speck():
    vessels = np.zeros((16, 16, 16), np.uint8)
    vessels[5, 6, :] = 1  # one voxel thin, off the every-4th-voxel lattice
    vessels[8, 8, :] = 1  # and one on it
    lr = downsample(encode_binary(vessels)[None].astype(np.float32), 4, ["vessels"])[0]
    # each line fills 4 of the 64 voxels of the blocks it crosses, on the lattice or not: -1 + 2 * 4/64
    partial = np.full(lr.shape, -1.0, np.float32)
    partial[1, 1], partial[2, 2] = -1 + 2 * 4 / 64, -1 + 2 * 4 / 64
    np.testing.assert_allclose(lr, partial, rtol=1e-6)  # (every 4th voxel: a full line, and nothing)


def test_clean_decode_of_a_noisy_phantom_keeps_lungs_apart_and_lobes_whole():
    phantom = generate_phantom(size=48, seed=3)
    truth = phantom.lobes
    volumes = {"ct": phantom.ct, "lobes": truth, "airway": phantom.airway, "vessels": phantom.vessels}
    x = encode_volume(volumes)
    noise = np.random.default_rng(0).normal(0, 0.1, truth.shape).astype(np.float32)
    x[1] = ndimage.gaussian_filter(x[1], 1.0) + noise  # smooth borders and noise, as a network's output
    plain, clean = decode_volume(x)["lobes"], decode_volume(x, clean=True)["lobes"]
    lobe = truth > 0
    assert (clean[lobe] == truth[lobe]).mean() > (plain[lobe] == truth[lobe]).mean() + 0.05
    middle = np.argwhere(lobe)[:, 0].mean()  # between the lungs on the patient's left-right axis (RAS x)
    ras_x = np.arange(48)[:, None, None]
    assert (np.isin(plain, RIGHT_LOBES) & (ras_x < middle - 8)).any()  # the plain decode strays across
    assert not (np.isin(clean, LEFT_LOBES) & (ras_x > middle)).any()
    assert not (np.isin(clean, RIGHT_LOBES) & (ras_x < middle)).any()
    for k in range(1, 6):
        assert ndimage.label(clean == k)[1] == 1, k  # each lobe one piece
    assert ndimage.label(plain == 4)[1] > 1  # (the plain decode has specks)
    exact = decode_volume(encode_volume(volumes))["lobes"]  # encoded labels decode exactly by default
    np.testing.assert_array_equal(exact, truth)


@pytest.mark.parametrize("name", CHANNELS)
def test_numpy_and_torch_agree(name):
    values = natural()[name]
    from_numpy = decode_channel(name, encode_channel(name, values))
    encoded = encode_channel(name, torch.from_numpy(values))
    assert isinstance(encoded, torch.Tensor) and encoded.is_floating_point()
    from_torch = decode_channel(name, encoded)
    assert isinstance(from_torch, torch.Tensor)
    # torch computes in float32, numpy in float64
    np.testing.assert_allclose(from_torch.double().numpy(), from_numpy, atol=1e-3)


def test_volume_round_trip():
    volumes = natural()
    x = encode_volume(volumes)
    assert x.shape == (4, 6, 7, 8) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    out = decode_volume(x)
    assert {k: v.dtype for k, v in out.items()} == {
        "ct": np.int16, "lobes": np.uint8, "airway": np.uint8, "vessels": np.uint8
    }  # fmt: skip
    np.testing.assert_array_equal(out["ct"], np.clip(volumes["ct"], HU_MIN, HU_MAX))
    for name in ("lobes", "airway", "vessels"):
        np.testing.assert_array_equal(out[name], volumes[name])


def test_volume_errors():
    volumes = natural()
    del volumes["vessels"]
    with pytest.raises(KeyError, match="vessels"):
        encode_volume(volumes)
    with pytest.raises(ValueError, match="expected 4 channels"):
        decode_volume(np.zeros((3, 4, 4, 4), np.float32))
