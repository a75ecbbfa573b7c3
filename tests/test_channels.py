"""Channel encodings: natural units <-> the diffusion range [-1, 1], for numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyn.data.channels import (
    CHANNELS,
    HU_MAX,
    HU_MIN,
    decode_binary,
    decode_channel,
    decode_ct,
    decode_lobes,
    decode_volume,
    encode_binary,
    encode_channel,
    encode_ct,
    encode_lobes,
    encode_volume,
)


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
    np.testing.assert_array_equal(decode_lobes(encoded + 0.19), labels)  # nearest label within half a step
    np.testing.assert_array_equal(decode_lobes(np.array([-1.5, 1.5])), [0, 5])
    mask = np.array([0, 1, 1, 0], np.uint8)
    np.testing.assert_array_equal(encode_binary(mask), [-1.0, 1.0, 1.0, -1.0])
    np.testing.assert_array_equal(decode_binary(encode_binary(mask).astype(np.float16) * 0.1), mask)


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
