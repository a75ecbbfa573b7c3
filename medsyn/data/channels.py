"""Channel conventions shared by data, training and generation.

The four channels are always in the order `ct, lobes, airway, vessels`:
- ct: Hounsfield units clipped to [-1024, 600], mapped linearly to [-1, 1];
- lobes: labels 0..5 as one scalar with the background in the middle and each lung's lobes on its own
  side (`LOBE_LEVELS`): left lower -1, left upper -1/2, background 0, right upper 1/3, right middle 2/3,
  right lower 1. A smooth border between two labels passes through every level between them; in this
  order a lung border only ever passes through lobes of its own lung, and the lobes of one lung are
  neighbours (the right middle lobe, between the upper and the lower, is the one level an upper-lower
  fissure crosses). Decoded to the nearest level;
- airway, vessels: binary masks encoded as -1 / +1, decoded by a threshold at 0.

A run may instead denoise the lobes as three analog bits (`lobe_encoding: bits`, Chen et al., 2023,
"Analog Bits"): six channels in all, made from the lobe levels at batch time (`to_net`) and turned back
into levels by the nearest valid code (`from_net`), so everything outside the network sees four channels.
Generated lobes are decoded "with the lungs in mind" (`decode_lobes_clean`, `medsyn.data.lobes`).

`ENCODING` names this convention; prepared caches and trained runs record it, and a cache made under
another convention is refused rather than decoded wrongly. The base-resolution stack of a cache is the
high-resolution one averaged over f^3 blocks (lobes: the most frequent label of the block), so thin
structures become partial values instead of aliased specks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from medsyn.data.lobes import Nearest, clean_lobes

CHANNELS: tuple[str, ...] = ("ct", "lobes", "airway", "vessels")
MASK_CHANNELS: tuple[str, ...] = CHANNELS[1:]
HU_MIN, HU_MAX = -1024.0, 600.0
NUM_LOBE_LABELS = 5  # 1 left upper, 2 left lower, 3 right upper, 4 right middle, 5 right lower
# the encoded level of each label 0..5 (see the module docstring)
LOBE_LEVELS = np.array([0.0, -0.5, -1.0, 1.0 / 3.0, 2.0 / 3.0, 1.0], dtype=np.float32)
# lobes by LOBE_LEVELS, base grid by block means; "medsyn-1": label / 5, every f-th voxel
ENCODING = "medsyn-2"
LOBE_ENCODINGS = ("levels", "bits")  # how a network denoises the lobes: one channel of levels, or 3 bits
# the bits (+1 / -1) of each label 0..5. Lobes that share a border differ in one bit where they can (a
# smooth border then passes through no third label), background and each lung's lobes in few; of the
# borders that flip two bits only background - left lower can pass through a lobe of the other lung.
LOBE_BITS = np.array(
    [[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, 1], [-1, 1, 1]], dtype=np.float32
)
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
    """Lobe labels 0..5 -> their levels in [-1, 1] (`LOBE_LEVELS`)."""
    if isinstance(labels, torch.Tensor):
        levels = torch.as_tensor(LOBE_LEVELS, device=labels.device)
        return levels[labels.round().long().clamp(0, NUM_LOBE_LABELS)]
    return LOBE_LEVELS[np.clip(np.rint(np.asarray(labels)), 0, NUM_LOBE_LABELS).astype(np.int64)]


# decision thresholds between consecutive levels, in ascending order of level
_LEVEL_ORDER = np.argsort(LOBE_LEVELS)
_THRESHOLDS = (LOBE_LEVELS[_LEVEL_ORDER][1:] + LOBE_LEVELS[_LEVEL_ORDER][:-1]) / 2.0


def decode_lobes(x: ArrayLike) -> ArrayLike:
    """[-1, 1] -> the label 0..5 of the nearest level."""
    if isinstance(x, torch.Tensor):
        rank = torch.bucketize(x.float(), torch.as_tensor(_THRESHOLDS, device=x.device))
        return torch.as_tensor(_LEVEL_ORDER, device=x.device)[rank].to(x.dtype)
    rank = np.searchsorted(_THRESHOLDS, np.asarray(x, dtype=np.float32))
    return _LEVEL_ORDER[rank].astype(np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else np.int64)


def nearest_level(values: np.ndarray) -> Nearest:
    """For `clean_lobes`: the label among `allowed` whose level lies nearest to `values` at voxels `where`."""

    def nearest(where: tuple[np.ndarray, ...], allowed: Sequence[int]) -> np.ndarray:
        allowed = np.asarray(allowed)
        distance = np.abs(values[where].astype(np.float32)[:, None] - LOBE_LEVELS[allowed])  # (n, k)
        return allowed[distance.argmin(1)]

    return nearest


def decode_lobes_clean(x: np.ndarray) -> np.ndarray:
    """A generated lobe channel (*spatial, levels) -> labels 0..5 (uint8), nearest levels cleaned with the
    lungs in mind (`medsyn.data.lobes.clean_lobes`: each lung holds only its own lobes, each lobe one
    piece, borders from the interior). For generated volumes; exact labels (a cache) need `decode_lobes`."""
    x = np.asarray(x, np.float32)
    return clean_lobes(decode_lobes(x).astype(np.uint8), nearest_level(x))


def _take(x: ArrayLike, index: int | Sequence[int], dim: int) -> ArrayLike:
    """`x` at `index` (an int drops `dim`, a sequence keeps it) along `dim`, for numpy and torch."""
    if isinstance(x, torch.Tensor):
        return x.select(dim, index) if isinstance(index, int) else x[(slice(None),) * dim + (list(index),)]
    return np.take(x, index, axis=dim)


def encode_lobe_bits(labels: ArrayLike, dim: int = 0) -> ArrayLike:
    """Lobe labels 0..5 (*S) -> their three analog bits (+1 / -1, `LOBE_BITS`) as a new axis `dim`."""
    if isinstance(labels, torch.Tensor):
        codes = torch.as_tensor(LOBE_BITS, device=labels.device)
        return codes[labels.round().long().clamp(0, NUM_LOBE_LABELS)].movedim(-1, dim)
    bits = LOBE_BITS[np.clip(np.rint(np.asarray(labels)), 0, NUM_LOBE_LABELS).astype(np.int64)]
    return np.moveaxis(bits, -1, dim)


def decode_lobe_bits(bits: ArrayLike, dim: int = 0) -> ArrayLike:
    """Three analog bits along `dim` -> the label 0..5 of the nearest valid code (float, like `decode_lobes`):
    the bits thresholded at 0 where they spell a label, else (codes 6 and 7) the nearest of the six."""
    planes = [_take(bits, i, dim) * 1.0 for i in range(LOBE_BITS.shape[1])]
    lib = _lib(planes[0])
    best = labels = None
    for label, code in enumerate(LOBE_BITS):  # the nearest code has the largest dot product with the bits
        score = sum(float(c) * p for c, p in zip(code, planes, strict=True))
        if label == 0:
            best, labels = score, score * 0.0
            continue
        better = score > best  # ties keep the lower label
        best, labels = lib.where(better, score, best), lib.where(better, float(label), labels)
    return labels


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


def net_channels(lobe_encoding: str = "levels", names: Sequence[str] = CHANNELS) -> tuple[str, ...]:
    """The channels a network of `lobe_encoding` denoises for the volume channels `names` (bits: `lobes`
    becomes `lobe_bit0..2`)."""
    bits = tuple(f"lobe_bit{i}" for i in range(LOBE_BITS.shape[1]))
    return tuple(c for n in names for c in (bits if n == "lobes" and lobe_encoding == "bits" else (n,)))


def to_net(
    x: ArrayLike, lobe_encoding: str = "levels", names: Sequence[str] = CHANNELS, dim: int = 1
) -> ArrayLike:
    """Volume channels `names` along `dim` (diffusion range, lobes as levels) -> the network's channels
    (`net_channels`): for bits, the lobe levels become the three bits of their nearest label."""
    if lobe_encoding == "levels" or "lobes" not in names:
        return x
    i = list(names).index("lobes")
    bits = encode_lobe_bits(decode_lobes(_take(x, i, dim)), dim)
    before, after = _take(x, range(i), dim), _take(x, range(i + 1, len(names)), dim)
    if isinstance(x, torch.Tensor):
        return torch.cat([before, bits.to(x.dtype), after], dim)
    return np.concatenate([before, bits.astype(x.dtype), after], dim)


def from_net(x: ArrayLike, lobe_encoding: str = "levels", dim: int = 1) -> ArrayLike:
    """All the network's channels (`net_channels`) along `dim` -> the four volume channels with the lobes
    as levels (bits: the levels of the nearest valid codes)."""
    if lobe_encoding == "levels":
        return x
    n = LOBE_BITS.shape[1]
    levels = encode_lobes(decode_lobe_bits(_take(x, range(1, 1 + n), dim), dim))
    levels = levels.unsqueeze(dim).to(x.dtype) if isinstance(x, torch.Tensor) else np.expand_dims(levels, dim)
    parts = [_take(x, [0], dim), levels, _take(x, range(1 + n, 3 + n), dim)]
    if isinstance(x, torch.Tensor):
        return torch.cat(parts, dim)
    return np.concatenate(parts, dim).astype(x.dtype)


def downsample(x: np.ndarray, factor: int, names: tuple[str, ...] | list[str] = CHANNELS) -> np.ndarray:
    """Encoded (C, *spatial) channels named `names` -> the base grid, `factor` times coarser: the mean of
    each factor^3 block (a partial volume for the masks), and for lobes the block's most frequent label
    (ties go to the lower label, background first). Spatial sizes must be multiples of `factor`."""
    x = np.asarray(x)
    if x.shape[0] != len(names):
        raise ValueError(f"expected {len(names)} channels ({', '.join(names)}), got {x.shape[0]}")
    if factor == 1:
        return np.ascontiguousarray(x)
    spatial = x.shape[1:]
    if any(s % factor for s in spatial):
        raise ValueError(f"spatial shape {spatial} is not divisible by the factor {factor}")
    blocks = [v for s in spatial for v in (s // factor, factor)]
    block_axes = tuple(range(2, 2 * len(spatial) + 1, 2))
    out = np.empty((x.shape[0], *(s // factor for s in spatial)), dtype=x.dtype)
    for c, name in enumerate(names):
        plane = x[c].reshape(blocks)
        if name == "lobes":
            labels = decode_lobes(plane.astype(np.float32)).astype(np.int64)
            counts = np.stack([(labels == k).sum(axis=tuple(a - 1 for a in block_axes))
                               for k in range(NUM_LOBE_LABELS + 1)])  # fmt: skip
            out[c] = encode_lobes(counts.argmax(0))
        else:
            out[c] = plane.astype(np.float32).mean(axis=tuple(a - 1 for a in block_axes))
    return out


def encode_volume(volumes: Mapping[str, np.ndarray]) -> np.ndarray:
    """Stack `{ct: HU, lobes: labels, airway: 0/1, vessels: 0/1}` into a (4, *spatial) float32 array."""
    missing = [c for c in CHANNELS if c not in volumes]
    if missing:
        raise KeyError(f"missing channels {missing}; expected all of {list(CHANNELS)}")
    return np.stack([np.asarray(encode_channel(c, volumes[c]), dtype=np.float32) for c in CHANNELS])


def decode_volume(x: np.ndarray, clean: bool = False) -> dict[str, np.ndarray]:
    """Split a (4, *spatial) array in the diffusion range into natural-unit arrays with file dtypes.

    ct -> int16 HU, lobes -> uint8 0..5, airway/vessels -> uint8 0/1.
    clean: decode the lobes with the lungs in mind (`decode_lobes_clean`), for generated volumes;
        off, every voxel gets its nearest label, which is exact for encoded labels (a cache, a fixed channel).
    """
    if x.shape[0] != len(CHANNELS):
        raise ValueError(f"expected {len(CHANNELS)} channels ({', '.join(CHANNELS)}), got {x.shape[0]}")
    x = np.asarray(x, dtype=np.float32)
    return {
        "ct": np.round(decode_ct(x[0])).astype(np.int16),
        "lobes": decode_lobes_clean(x[1]) if clean else decode_lobes(x[1]).astype(np.uint8),
        "airway": decode_binary(x[2]).astype(np.uint8),
        "vessels": decode_binary(x[3]).astype(np.uint8),
    }
