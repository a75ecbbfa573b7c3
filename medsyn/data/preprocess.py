"""Bring a CT and its masks onto the training grid: RAS, isotropic spacing, a cubic size.

One chain of MONAI transforms (Orientation -> Spacing -> [Resize] -> ResizeWithPadOrCrop) is run on the
CT (trilinear) and on every mask (nearest neighbour), so all channels share one grid and one affine.
Padding is air: the CT is shifted by +1024 HU before resampling, so zero padding means -1024 HU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Resize, ResizeWithPadOrCrop, Spacing

from medsyn.data.channels import HU_MIN
from medsyn.errors import ConfigError

FITS = ("crop", "resize")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessConfig:
    """Target grid. `fit="crop"`: resample to `spacing_mm`, then crop/pad about the centre to `size`;
    `fit="resize"`: resample to `spacing_mm`, scale so the longest side is `size` (keeping the aspect
    ratio, so the spacing grows), then pad."""

    size: int | tuple[int, int, int] = 256
    spacing_mm: float | tuple[float, float, float] = 1.0
    fit: str = "crop"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ConfigError(f"fit={self.fit!r}: expected one of {FITS}")
        if min(self.shape) < 1:
            raise ConfigError(f"size={self.size!r}: expected positive sizes")
        if min(np.broadcast_to(self.spacing_mm, (3,))) <= 0:
            raise ConfigError(f"spacing_mm={self.spacing_mm!r}: expected positive spacing")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in np.broadcast_to(self.size, (3,)))  # type: ignore[return-value]


def override_spacing(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Keep the affine's axis directions and origin, replace its voxel sizes (e.g. from CT-RATE metadata)."""
    affine = np.array(affine, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    affine[:3, :3] = affine[:3, :3] / norms * np.asarray(spacing, dtype=np.float64)
    return affine


def apply_rescale(array: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> HU (`value * slope + intercept`), as DICOM and CT-RATE metadata prescribe."""
    return array * np.float32(slope) + np.float32(intercept)


def _resample(array: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig, label: bool):
    mode = "nearest" if label else "bilinear"
    x = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32))[None], affine=torch.as_tensor(affine))
    x = Orientation(axcodes="RAS", labels=_RAS_LABELS)(x)
    x = Spacing(pixdim=cfg.spacing_mm, diagonal=True, mode=mode, padding_mode="zeros", dtype=np.float32)(x)
    if cfg.fit == "resize":
        longest = max(cfg.shape)
        x = Resize(spatial_size=longest, size_mode="longest", mode="nearest" if label else "trilinear")(x)
    x = ResizeWithPadOrCrop(spatial_size=cfg.shape, mode="constant")(x)
    return x.array[0] if hasattr(x, "array") else np.asarray(x[0]), np.asarray(x.affine, dtype=np.float64)


def to_grid(
    ct_hu: np.ndarray, affine: np.ndarray, masks: Mapping[str, np.ndarray], cfg: PreprocessConfig
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Resample a CT (HU) and masks sharing its voxel grid to the target grid.

    Returns `(ct HU float32 (S, S, S), {name: uint8 mask}, affine)`; the affine is RAS with the target spacing.
    """
    shifted, out_affine = _resample(np.asarray(ct_hu, dtype=np.float32) - HU_MIN, affine, cfg, label=False)
    ct = np.asarray(shifted, dtype=np.float32) + np.float32(HU_MIN)
    out_masks = {}
    for name, mask in masks.items():
        resampled, _ = _resample(mask, affine, cfg, label=True)
        out_masks[name] = np.rint(np.asarray(resampled)).astype(np.uint8)
    return ct, out_masks, out_affine
