"""Voxel grids of the cache and of generated volumes, and moving volumes between the two resolutions.

The cache keeps every subject at two resolutions: the high-resolution grid (256^3 at 1 mm at paper
scale) and its every `LR_FACTOR`-th voxel (64^3). The base model generates on the low-resolution grid,
the SR model on the high-resolution one, from the low-resolution volume upsampled by `upsample`.
`run_grid` tells the grid a run was trained on from its config; `bring_to_grid` moves any volume onto
a grid (as it is, by block means, or by the `medsyn prepare` chain).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medsyn.data.channels import HU_MIN, decode_channel, downsample, encode_channel
from medsyn.data.nifti import spacing_affine
from medsyn.errors import ConfigError, DataError

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


def on_grid(shape: Sequence[int], affine: np.ndarray, grid: Grid) -> bool:
    """True when a volume already lies on `grid`: same shape, RAS axes and spacing."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return (
        tuple(shape) == tuple(grid.shape)
        and nib.aff2axcodes(affine) == ("R", "A", "S")
        and np.allclose(spacing, grid.spacing, rtol=1e-3)
    )


def check_extent(shape: Sequence[int], affine: np.ndarray, grid: Grid, path: str | os.PathLike) -> None:
    """Refuse (`DataError` naming `path`) a volume whose field of view is far from `grid`'s (under half or
    over four times it along an axis), which resampling onto the grid would mostly pad or crop away."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.asarray(shape) * spacing
    target = np.asarray(grid.shape) * np.asarray(grid.spacing)
    if np.any(extent < 0.5 * target) or np.any(extent > 4.0 * target) or min(shape) < 2:
        raise DataError(
            f"{path}: shape {tuple(shape)} at {np.round(spacing, 3).tolist()} mm covers "
            f"{np.round(extent).tolist()} mm, cannot be brought onto the run's grid of {list(grid.shape)} voxels "
            f"at {list(grid.spacing)} mm ({np.round(target).tolist()} mm); expected a volume covering "
            "about the same field of view, or one on the run's grid"
        )


def bring_to_grid(
    name: str, values: np.ndarray, affine: np.ndarray, grid: Grid, path: str | os.PathLike,
    hr_grid: Grid | None = None, factor: int = 1,
) -> tuple[np.ndarray, str]:  # fmt: skip
    """`values` on `grid`, and how it got there: as is, `factor`^3 blocks of `hr_grid` decoded from their
    mean (lobes: majority; the cache's own downsampling), or resampled by the `medsyn prepare` chain
    (RAS, spacing, crop/pad)."""
    if on_grid(values.shape, affine, grid):
        return values, "on the run's grid"
    if hr_grid is not None and factor > 1 and on_grid(values.shape, affine, hr_grid):
        coarse = downsample(np.asarray(encode_channel(name, values), np.float32)[None], factor, [name])[0]
        return decode_channel(name, coarse), f"{factor}^3 block averages of the run's high-resolution grid"
    from medsyn.data.preprocess import PreprocessConfig, to_grid

    check_extent(values.shape, affine, grid, path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    cfg = PreprocessConfig(size=tuple(grid.shape), spacing_mm=tuple(grid.spacing))
    if name == "ct":
        out, _, _ = to_grid(values, affine, {}, cfg)
    else:
        _, masks, _ = to_grid(np.full(values.shape, HU_MIN, np.float32), affine, {name: values}, cfg)
        out = masks[name]
    return out, f"resampled from {list(values.shape)} at {np.round(spacing, 4).tolist()} mm"


def _manifest_grid(root: Path) -> tuple[Grid, int] | None:
    """The hr grid and lr factor from a prepared cache's manifest, or None when there is none."""
    from medsyn.data.cache import read_cache_manifest

    if not (root / "manifest.csv").is_file():
        return None
    rows = read_cache_manifest(root)
    if not rows or not rows[0].get("size"):
        return None
    size, lr_size = int(rows[0]["size"]), int(rows[0].get("lr_size") or 0)
    spacing = float(rows[0].get("spacing_mm") or 1.0)
    factor = size // lr_size if lr_size else LR_FACTOR
    shape = (size,) * 3
    return Grid(shape, (spacing,) * 3, spacing_affine(spacing, shape), f"cache {root}"), factor


def run_grid(config: dict) -> tuple[Grid, int]:
    """The high-resolution grid of a run's data and its lr factor, from the most specific record:

    1. `config["grid"]` ({size, spacing_mm, lr_factor}) when a run records it;
    2. the manifest of the cache at `data.root` (the spacing the run was really trained at);
    3. `data.phantoms` ({size, spacing_mm, lr_factor}) when the run generated its own phantom data;
    4. paper scale: the preset's size at 1 mm, times 4 for a model of the low-resolution grid.
    """
    data = config.get("data") or {}
    if config.get("grid"):
        g = config["grid"]
        size, spacing = int(g["size"]), float(g.get("spacing_mm", 1.0))
        shape = (size,) * 3
        factor = int(g.get("lr_factor", LR_FACTOR))
        return Grid(shape, (spacing,) * 3, spacing_affine(spacing, shape), "run config"), factor
    if data.get("root"):
        found = _manifest_grid(Path(data["root"]))
        if found is not None:
            return found
    phantoms = data.get("phantoms") or {}
    if phantoms.get("size"):
        size = int(phantoms["size"])
        spacing = float(phantoms.get("spacing_mm") or 256.0 / size)
        shape = (size,) * 3
        factor = int(phantoms.get("lr_factor") or LR_FACTOR)
        return Grid(shape, (spacing,) * 3, spacing_affine(spacing, shape), "data.phantoms"), factor
    from medsyn.nn.presets import DEFAULT_SIZE

    preset = (config.get("model") or {}).get("preset", "")
    size = DEFAULT_SIZE.get(preset, 64) * (LR_FACTOR if data.get("resolution") == "lr" else 1)
    shape = (size,) * 3
    return Grid(shape, (1.0,) * 3, spacing_affine(1.0, shape), "default (1 mm)"), LR_FACTOR
