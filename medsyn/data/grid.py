"""Voxel grids of the cache and of generated volumes, and moving volumes between the two resolutions.

The cache keeps every subject at two resolutions: the high-resolution grid (256^3 at 1 mm at paper
scale) and its every `LR_FACTOR`-th voxel (64^3). The base model generates on the low-resolution grid,
the SR model on the high-resolution one, from the low-resolution volume upsampled by `upsample`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsyn.errors import ConfigError

LR_FACTOR = 4  # the cache's low-resolution stack is every 4th voxel of the high-resolution one
UPSAMPLE_MODES = ("nearest", "trilinear")


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape (I, J, K), spacing in mm and the RAS affine of the written NIfTI files."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str = ""

    def coarsen(self, factor: int) -> Grid:
        """The grid of every `factor`-th voxel (voxel 0 shared), as the cache's low-resolution stack."""
        affine = self.affine.copy()
        affine[:3, :3] *= factor
        shape = tuple(-(-s // factor) for s in self.shape)
        return Grid(shape, tuple(s * factor for s in self.spacing), affine, self.source)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing),
            "affine": np.asarray(self.affine).round(6).tolist(),
            "source": self.source,
        }


def upsample(lr: torch.Tensor, factor: int, mode: str = "nearest") -> torch.Tensor:
    """(C, d, h, w) -> (C, d*f, h*f, w*f) by nearest or trilinear interpolation (align_corners=False)."""
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"upsample={mode!r}: expected one of {UPSAMPLE_MODES}")
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(lr[None].float(), scale_factor=factor, mode=mode, **kwargs)[0]
