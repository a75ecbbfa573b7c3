"""Word maps of a trained alignment model: where in a CT volume each word of a report finds its patches.

- `align_grid`: the grid an align run was trained on (its cache's high-resolution grid and base factor).
- `align_input`: a CT in HU on any grid, with the masks it has -> the run's 4-channel base-grid input,
  made as the cache made the training data (the `medsyn prepare` chain onto the high-resolution grid,
  missing masks from a segmentation backend, channels encoded, f^3 block means), and the
  `PatchGeometry` saying where each patch token lies in the world.
- `upsample_maps`: (W, *patch grid) similarities -> any voxel grid (the input's own) by trilinear
  interpolation with each patch's value at its centre's world position; on the high-resolution grid this
  is `F.interpolate(mode="trilinear", align_corners=False)` by the patch stride.
- `pair_scores`: the global report-volume similarity and the fine-grained word-patch score.
- `align_map`: all of it for one volume and one text (`medsyn align-map` writes it: `map_files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from medsyn.alignment.model import Grid as PatchGrid
from medsyn.alignment.run import AlignRun
from medsyn.data.channels import MASK_CHANNELS, downsample, encode_volume
from medsyn.data.grid import Grid, check_extent, on_grid, run_grid
from medsyn.data.segment import Segmenter, segment
from medsyn.errors import DataError

SLAB_VOXELS = 1 << 21  # `upsample_maps` samples the target grid in slabs of about this many voxels


def align_grid(run: AlignRun) -> tuple[Grid, int]:
    """The high-resolution grid of the align run's cache and its base factor f: the model saw the f^3
    block means of that grid. Found as for the diffusion runs (`run_grid`), from `data.root`'s manifest
    or `data.phantoms`; a run whose config names neither, or a radiograph (2D) run, is a `DataError`."""
    if run.spatial_dims != 3:
        raise DataError(
            f"{run.weights}: an align run of radiographs (model.spatial_dims={run.spatial_dims}); word maps, "
            "alignment scores and the pointing game need a run trained on CT volumes"
        )
    hr_grid, factor = run_grid(run.config)
    if hr_grid.source.startswith("default"):
        root = (run.config.get("data") or {}).get("root")
        raise DataError(
            f"{run.weights}: cannot tell the grid the align run was trained on: data.root={root!r} has no "
            "manifest.csv from here and the config has no data.phantoms; run from the directory it was "
            "trained in"
        )
    return hr_grid, factor


@dataclass(frozen=True)
class PatchGeometry:
    """Where the patch tokens of an align input lie: the input is the f^3 block means of a source grid
    (`affine`, `shape`: the high-resolution grid, or the base grid itself with f = 1), so patch p covers
    the source voxels [stride * p, stride * (p + 1)) along each axis, stride = f x patch size."""

    affine: np.ndarray  # (4, 4) source voxel -> world (mm)
    shape: tuple[int, ...]  # (I, J, K) of the source grid
    stride: int
    grid: PatchGrid  # patches per axis

    @property
    def patch_affine(self) -> np.ndarray:
        """(4, 4) patch index (continuous) -> world position (mm); integers land on patch centres."""
        scale = np.diag([float(self.stride)] * 3 + [1.0])
        scale[:3, 3] = (self.stride - 1) / 2.0  # the centre of a patch's voxels, in source voxels
        return np.asarray(self.affine, np.float64) @ scale

    def centre(self, index: int) -> np.ndarray:
        """The world position (mm, (3,)) of patch token `index` (C order over `grid`)."""
        position = np.unravel_index(int(index), self.grid)
        return (self.patch_affine @ np.array([*position, 1.0]))[:3]


@dataclass
class AlignInput:
    """A volume as the align model takes it: `x` (4, *S) on the base grid, in the diffusion range."""

    x: torch.Tensor
    geometry: PatchGeometry
    how: str  # how it reached the base grid, for the record


def align_input(
    hu: np.ndarray,
    affine: np.ndarray,
    masks: Mapping[str, np.ndarray],
    hr_grid: Grid,
    factor: int,
    patch_size: int,
    segmenter: Segmenter | None = None,
    where: str | os.PathLike = "volume",
) -> AlignInput:
    """A CT (I, J, K) in HU with `affine` and any of its masks -> the align run's base-grid input.

    On the base grid already (a base-only sample): encoded as it is. Otherwise brought onto `hr_grid`
    (as it is when on it, else by the `medsyn prepare` chain), encoded, and averaged over f^3 blocks
    (lobes: majority), as the cache's base stack is. Masks it lacks come from `segmenter` (the threshold
    backend for any it does not give) on the grid it is encoded on. `where` names the volume in errors.
    """
    from medsyn.data.preprocess import PreprocessConfig, to_grid

    base = hr_grid.coarsen(factor)
    masks = dict(masks)
    if on_grid(hu.shape, affine, base):
        source, f, how = np.asarray(affine, np.float64), 1, "on the align run's base grid"
    elif on_grid(hu.shape, affine, hr_grid):
        source, f, how = np.asarray(affine, np.float64), factor, f"{factor}^3 block means of its grid"
    else:
        check_extent(hu.shape, affine, hr_grid, where)
        spacing = np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist()
        how = (f"resampled from {list(hu.shape)} at {spacing} mm to {list(hr_grid.shape)} at "
               f"{list(hr_grid.spacing)} mm, then {factor}^3 block means")  # fmt: skip
        cfg = PreprocessConfig(size=tuple(hr_grid.shape), spacing_mm=tuple(hr_grid.spacing))
        hu, masks, source = to_grid(hu, affine, masks, cfg)
        f = factor
    missing = [c for c in MASK_CHANNELS if c not in masks]
    if missing:
        masks = segment(hu, source, segmenter, given=masks)
        how += f"; {', '.join(missing)} segmented"
    x = downsample(encode_volume({"ct": hu, **masks}), f)  # (4, *S)
    patch_grid = tuple(n // patch_size for n in x.shape[1:])
    if any(n % patch_size for n in x.shape[1:]):
        raise DataError(
            f"{where}: base grid {list(x.shape[1:])} is not a multiple of the patch size {patch_size}"
        )
    geometry = PatchGeometry(source, tuple(hu.shape), f * patch_size, patch_grid)
    return AlignInput(torch.from_numpy(np.ascontiguousarray(x, np.float32)), geometry, how)


def upsample_maps(
    maps: torch.Tensor, geometry: PatchGeometry, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """Patch maps (W, *geometry.grid) -> (W, *shape) float32 on the voxel grid `affine`, `shape`.

    Trilinear interpolation between patch centres placed at their world positions (`grid_sample` on
    the continuous patch index of each target voxel's world position; values beyond the outer patch
    centres are those of the nearest patch, as `F.interpolate` does). Voxels outside the source grid's
    field of view (cropped away on the way to the align grid) have no patch: NaN.
    """
    maps = torch.as_tensor(maps, dtype=torch.float32).reshape(1, -1, *geometry.grid)  # (1, W, *grid)
    affine = np.asarray(affine, np.float64)
    to_patch = (np.linalg.inv(geometry.patch_affine) @ affine)[:3]  # (3, 4) target voxel -> patch index
    to_source = (np.linalg.inv(geometry.affine) @ affine)[:3]  # (3, 4) target voxel -> source voxel
    extent = np.asarray(geometry.shape, np.float64) - 0.5
    last = np.asarray(geometry.grid, np.float64) - 1.0
    out = np.empty((maps.shape[1], *shape), np.float32)
    plane = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1).reshape(-1, 2)
    ones = np.ones((len(plane), 1))
    rows = max(1, SLAB_VOXELS // len(plane))
    for i0 in range(0, shape[0], rows):
        n = min(rows, shape[0] - i0)
        ijk = np.concatenate([np.concatenate([np.full((len(plane), 1), i), plane, ones], 1)
                              for i in range(i0, i0 + n)])  # (N, 4) homogeneous target voxels  # fmt: skip
        index = ijk @ to_patch.T  # (N, 3) continuous patch index
        normalised = np.where(last > 0, 2.0 * index / np.maximum(last, 1.0) - 1.0, 0.0)  # align_corners=True
        at = torch.from_numpy(normalised[:, ::-1].astype(np.float32))  # grid_sample's order: (k, j, i)
        values = F.grid_sample(maps, at.reshape(1, n, shape[1], shape[2], 3), mode="bilinear",
                               padding_mode="border", align_corners=True)[0]  # (W, n, J, K), trilinear in 3-D  # fmt: skip
        source = ijk @ to_source.T  # (N, 3)
        outside = ((source < -0.5) | (source > extent)).any(1).reshape(n, shape[1], shape[2])
        values[:, torch.from_numpy(outside)] = float("nan")
        out[:, i0 : i0 + n] = values.numpy()
    return out


def pair_scores(
    report: torch.Tensor, words: torch.Tensor, volume: torch.Tensor, patches: torch.Tensor
) -> dict[str, float | None]:
    """Scores of one report-volume pair from normalised embeddings: `global`, the cosine similarity of the
    report (D,) and volume (D,) embeddings (as the CLIP score of CT-CLIP), and `fine`, the mean over the
    report's words (W, D) of each word's best patch (P, D) similarity (None for a report without words)."""
    fine = float((words.to(patches) @ patches.T).amax(1).mean()) if len(words) else None
    return {"global": float(report.to(volume) @ volume), "fine": fine}


@dataclass
class WordMaps:
    """One text against one volume: its words, their similarity with every patch (W, P), the pair's
    scores (`pair_scores`), where the patches lie and how the volume reached the align grid."""

    text: str
    words: list[str]
    similarity: torch.Tensor  # (W, P)
    scores: dict[str, float | None]
    geometry: PatchGeometry
    how: str


def align_map(
    run: AlignRun,
    hu: np.ndarray,
    affine: np.ndarray,
    masks: Mapping[str, np.ndarray],
    text: str,
    segmenter: Segmenter | None = None,
    where: str | os.PathLike = "volume",
) -> WordMaps:
    """Embed a CT (I, J, K, HU, with `affine` and any masks) and `text` with the align run and compare
    every word of the text with every patch of the volume."""
    hr_grid, factor = align_grid(run)
    data = align_input(hu, affine, masks, hr_grid, factor, run.patch_size, segmenter, where)
    volume, patches, grid = run.encode_volumes(data.x[None])  # (1, D), (1, P, D)
    if tuple(grid) != tuple(data.geometry.grid):
        raise DataError(f"{where}: the align model made a patch grid {grid}, expected {data.geometry.grid}")
    report, words, feats = run.encode_reports([text])
    if not words[0]:
        raise DataError(f"--text {text!r}: has no words the align run's tokenizer keeps")
    similarity = run.word_patch_similarity(feats[0], patches[0]).cpu()  # (W, P)
    scores = pair_scores(report[0], feats[0], volume[0], patches[0])
    return WordMaps(text, list(words[0]), similarity, scores, data.geometry, data.how)
