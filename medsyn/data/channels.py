"""Channel conventions shared by data, training and generation.

The four channels are always in the order `ct, lobes, airway, vessels`:
- ct: Hounsfield units clipped to [-1024, 600], mapped linearly to [-1, 1];
- lobes: labels 0..5, encoded as label / 5 mapped to [-1, 1], decoded by rounding;
- airway, vessels: binary masks encoded as -1 / +1, decoded by a threshold at 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

CHANNELS: tuple[str, ...] = ("ct", "lobes", "airway", "vessels")
MASK_CHANNELS: tuple[str, ...] = CHANNELS[1:]
HU_MIN, HU_MAX = -1024.0, 600.0
NUM_LOBE_LABELS = 5  # 1 left upper, 2 left lower, 3 right upper, 4 right middle, 5 right lower
LOBE_NAMES = {
    1: "left upper",
    2: "left lower",
    3: "right upper",
    4: "right middle",
    5: "right lower",
}

ArrayLike = np.ndarray | torch.Tensor


def _lib(x: ArrayLike):
    return torch if isinstance(x, torch.Tensor) else np


def encode_ct(hu: ArrayLike) -> ArrayLike:
    """HU -> [-1, 1], clipping to the [-1024, 600] window."""
    lib = _lib(hu)
    hu = lib.clip(hu * 1.0, HU_MIN, HU_MAX)
    return (hu - HU_MIN) / (HU_MAX - HU_MIN) * 2.0 - 1.0


def decode_ct(x: ArrayLike) -> ArrayLike:
    """[-1, 1] -> HU (float, in the window); round and cast to int16 when writing."""
    lib = _lib(x)
    x = lib.clip(x * 1.0, -1.0, 1.0)
    return (x + 1.0) / 2.0 * (HU_MAX - HU_MIN) + HU_MIN


def encode_lobes(labels: ArrayLike) -> ArrayLike:
    """Lobe labels 0..5 -> [-1, 1]."""
    return labels * (2.0 / NUM_LOBE_LABELS) - 1.0


def decode_lobes(x: ArrayLike) -> ArrayLike:
    """[-1, 1] -> nearest lobe label in 0..5."""
    lib = _lib(x)
    labels = lib.round((x + 1.0) * (NUM_LOBE_LABELS / 2.0))
    return lib.clip(labels, 0, NUM_LOBE_LABELS)


def encode_binary(mask: ArrayLike) -> ArrayLike:
    """Binary mask {0, 1} -> {-1, +1}."""
    return (mask > 0) * 2.0 - 1.0


def decode_binary(x: ArrayLike) -> ArrayLike:
    """Threshold at 0 -> {0, 1}."""
    return (x > 0) * 1


ENCODERS = {"ct": encode_ct, "lobes": encode_lobes, "airway": encode_binary, "vessels": encode_binary}
DECODERS = {"ct": decode_ct, "lobes": decode_lobes, "airway": decode_binary, "vessels": decode_binary}


def encode_channel(name: str, values: ArrayLike) -> ArrayLike:
    """Encode one channel given in its natural units (HU, labels, 0/1) to the diffusion range."""
    return ENCODERS[name](values)


def decode_channel(name: str, x: ArrayLike) -> ArrayLike:
    """Decode one channel from the diffusion range to its natural units (HU float, labels, 0/1)."""
    return DECODERS[name](x)


def encode_volume(volumes: Mapping[str, np.ndarray]) -> np.ndarray:
    """Stack `{ct: HU, lobes: labels, airway: 0/1, vessels: 0/1}` into a (4, *spatial) float32 array."""
    missing = [c for c in CHANNELS if c not in volumes]
    if missing:
        raise KeyError(f"missing channels {missing}; expected all of {list(CHANNELS)}")
    return np.stack([np.asarray(encode_channel(c, volumes[c]), dtype=np.float32) for c in CHANNELS])


def decode_volume(x: np.ndarray) -> dict[str, np.ndarray]:
    """Split a (4, *spatial) array in the diffusion range into natural-unit arrays with file dtypes.

    ct -> int16 HU, lobes -> uint8 0..5, airway/vessels -> uint8 0/1.
    """
    if x.shape[0] != len(CHANNELS):
        raise ValueError(f"expected {len(CHANNELS)} channels ({', '.join(CHANNELS)}), got {x.shape[0]}")
    x = np.asarray(x, dtype=np.float32)
    return {
        "ct": np.round(decode_ct(x[0])).astype(np.int16),
        "lobes": decode_lobes(x[1]).astype(np.uint8),
        "airway": decode_binary(x[2]).astype(np.uint8),
        "vessels": decode_binary(x[3]).astype(np.uint8),
    }
