"""NIfTI reading and writing with true affines (nibabel), written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medsyn.errors import DataError
from medsyn.io import atomic_path

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")  # nibabel decompresses by file-name suffix


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


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def open_nifti(path: str | os.PathLike) -> nib.spatialimages.SpatialImage:
    """Parse a NIfTI file's header; nibabel reads the voxels only when `image.dataobj` is converted."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"{path}: cannot read as NIfTI ({_one_line(err)})") from err


def stored_bytes(image: nib.spatialimages.SpatialImage) -> int | None:
    """Bytes of voxel data an uncompressed image file holds after its header; None when unknown
    without decompressing (a compressed file) or not a plain file."""
    proxy = image.dataobj
    filename = getattr(proxy, "file_like", None)
    if (
        not isinstance(filename, str)
        or filename.endswith(COMPRESSED_SUFFIXES)
        or not hasattr(proxy, "offset")
    ):
        return None
    return max(os.path.getsize(filename) - int(proxy.offset), 0)


def volume_shape(path: str | os.PathLike, shape: Sequence[int]) -> tuple[int, int, int]:
    """The 3-D shape of a stored shape (extra axes of length 1 dropped), else `DataError`."""
    shape = tuple(int(s) for s in shape)
    squeezed = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    if len(squeezed) != 3 or min(squeezed) < 1:
        raise DataError(f"{path}: expected a 3-D volume, got shape {shape}")
    return squeezed  # type: ignore[return-value]


def read_nifti(image: nib.spatialimages.SpatialImage, dtype=np.float32) -> np.ndarray:
    """Read an opened image's voxels as a 3-D array. Raises `DataError` naming the file."""
    path = image.get_filename()
    shape = volume_shape(path, image.shape)
    try:
        array = np.asarray(image.dataobj, dtype=dtype)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"{path}: cannot read as NIfTI ({_one_line(err)})") from err
    return array.reshape(shape)


def load_nifti(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume; return `(array, affine)`. Raises `DataError` naming the file."""
    image = open_nifti(path)
    return read_nifti(image, dtype), np.asarray(image.affine, dtype=np.float64)
