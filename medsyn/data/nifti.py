"""NIfTI reading and writing with true affines (nibabel), written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medsyn.errors import DataError
from medsyn.io import atomic_path


def spacing_affine(spacing: float | Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """A RAS affine with the given voxel spacing (mm) whose volume centre sits at the origin."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape[-3:], dtype=np.float64) - 1) / 2.0
    return affine


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=None) -> None:
    """Write `array` (D, H, W in voxel order i, j, k) with `affine` to `path`, atomically."""
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    if np.issubdtype(array.dtype, np.integer):
        image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def load_nifti(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume; return `(array, affine)`. Raises `DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj, dtype=dtype)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from err
    array = np.squeeze(array) if array.ndim > 3 else array
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(array.shape)}")
    return array, np.asarray(image.affine, dtype=np.float64)
