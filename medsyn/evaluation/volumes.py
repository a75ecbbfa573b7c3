"""Find and read the volumes `medsyn evaluate` compares, whatever folder they come in.

A source is one of:
- a sample folder written by sample.py: `OUT/<index>/ct.nii.gz` (+ masks, meta.json with the prompt);
- a phantom folder or any generic manifest: `manifest.csv` with `id, ct[, lobes, airway, vessels]`
  columns, paths relative to the manifest (phantom subjects also carry `truth.json`);
- a prepared cache: `manifest.csv` with `id, hr, lr, ..., split` (the 4-channel hr.npy arrays, or with
  `grid="lr"` the base-grid lr.npy ones, to compare a base model's samples with what it learned from);
- a folder of NIfTI CT files (`*.nii`, `*.nii.gz`), one volume each, with no masks;
- a manifest file given directly (either kind of manifest.csv).

Nothing is read here but file names, manifests and small JSON files; `load_volume` reads the voxels.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsyn.data.cache import LR_FILE, META_FILE, SPLITS, encoding_problem, load_array
from medsyn.data.channels import CHANNELS, MASK_CHANNELS, decode_volume
from medsyn.data.nifti import load_nifti, spacing_affine
from medsyn.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class VolumeRef:
    """Where one volume lives: NIfTI files (`ct` + optional masks) or a cached 4-channel array."""

    id: str
    source: str  # the CT file or cached array, for messages and identity
    ct: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)
    cached: Path | None = None  # hr.npy of a prepared cache
    prompt: str | None = None  # the report a sample was generated from, or a subject's report
    truth: Path | None = None  # phantom ground truth
    preview: Path | None = None  # sample.py's preview.png


@dataclass
class Volume:
    """A loaded volume: CT in HU on a RAS grid, its affine, and the masks that came with it."""

    hu: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # (4, 4)
    masks: dict[str, np.ndarray]  # uint8, any subset of lobes / airway / vessels

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _nifti_stem(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the manifest ({err})") from err


def _report(row: dict) -> str | None:
    parts = [
        f"{k.capitalize()}: {row[k].strip()}" for k in ("findings", "impression") if row.get(k, "").strip()
    ]
    return " ".join(parts) or None


def _from_manifest(path: Path, split: str | None, grid: str = "hr") -> list[VolumeRef]:
    rows = _read_csv(path)
    root = path.parent
    if not rows:
        raise DataError(f"{path}: the manifest lists no volumes")
    columns = set(rows[0])
    if "id" not in columns or not ({"ct", "hr"} & columns):
        raise DataError(f"{path}: expected an `id` column and a `ct` (NIfTI) or `hr` (cache) column")
    if "hr" in columns and encoding_problem(path, rows[0].get("encoding")):
        raise DataError(encoding_problem(path, rows[0].get("encoding")))
    if split is not None:
        if "split" not in columns:
            raise DataError(f"{path}: --split {split} needs a `split` column (a prepared cache's manifest)")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataError(f"{path}: no subjects in split {split!r}")
    refs = []
    for row in rows:
        prompt = _report(row)
        if "hr" in columns:
            if grid not in columns:
                raise DataError(f"{path}: no `{grid}` column for the cache grid {grid!r}")
            refs.append(VolumeRef(row["id"], str(root / row[grid]), cached=root / row[grid], prompt=prompt))
            continue
        ct = root / row["ct"]
        masks = {c: root / row[c] for c in MASK_CHANNELS if row.get(c)}
        truth = ct.parent / "truth.json"
        refs.append(VolumeRef(row["id"], str(ct), ct=ct, masks=masks, prompt=prompt,
                              truth=truth if truth.is_file() else None))  # fmt: skip
    return refs


def _sample_ref(folder: Path) -> VolumeRef:
    masks = {c: folder / f"{c}.nii.gz" for c in MASK_CHANNELS if (folder / f"{c}.nii.gz").is_file()}
    prompt = None
    try:
        prompt = json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("prompt")
    except (OSError, ValueError, AttributeError):
        pass
    preview = folder / "preview.png"
    return VolumeRef(folder.name, str(folder / "ct.nii.gz"), ct=folder / "ct.nii.gz", masks=masks,
                     prompt=prompt, preview=preview if preview.is_file() else None)  # fmt: skip


def _sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


CACHE_GRIDS = ("hr", "lr")


def find_volumes(path: str | os.PathLike, split: str | None = None, grid: str = "hr") -> list[VolumeRef]:
    """The volumes at `path` (see the module docstring), in a stable order.

    `split` (train/val/test) keeps only that split of a prepared cache; `grid` picks a cache's
    high-resolution stack ("hr") or its base grid ("lr").
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {list(SPLITS)}")
    if grid not in CACHE_GRIDS:
        raise DataError(f"cache grid {grid!r}: expected one of {list(CACHE_GRIDS)}")
    if path.is_file():
        if path.suffix != ".csv":
            raise DataError(f"{path}: expected a folder or a manifest.csv")
        return _from_manifest(path, split, grid)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder or manifest")
    if (path / "manifest.csv").is_file():
        return _from_manifest(path / "manifest.csv", split, grid)
    if split is not None:
        raise DataError(
            f"{path}: --split {split} applies to a prepared cache; this folder has no manifest.csv"
        )
    entries = sorted(os.listdir(path), key=_sort_key)
    samples = [_sample_ref(path / n) for n in entries if (path / n / "ct.nii.gz").is_file()]
    if samples:
        return samples
    files = [(path / n, _nifti_stem(path / n)) for n in entries]
    refs = [VolumeRef(stem, str(f), ct=f) for f, stem in files if stem and f.is_file()]
    if refs:
        return refs
    raise DataError(
        f"{path}: found no volumes; expected sample folders (<index>/ct.nii.gz), a manifest.csv "
        "(phantom folder or prepared cache) or NIfTI files"
    )


def volume_ref(path: str | os.PathLike, masks: dict[str, str | os.PathLike] | None = None) -> VolumeRef:
    """One volume: a folder holding `ct.nii.gz` (a sample folder or a phantom subject, with the masks
    and meta.json beside it) or a NIfTI CT file, whose masks `masks` names (channel -> NIfTI file)."""
    path = Path(path)
    masks = {name: Path(p) for name, p in (masks or {}).items()}
    for name, mask_path in masks.items():
        if name not in MASK_CHANNELS:
            raise DataError(
                f"mask {name}={mask_path}: unknown channel; expected one of {', '.join(MASK_CHANNELS)}"
            )
        if not mask_path.is_file():
            raise DataError(f"{mask_path}: no such {name} mask file")
    if path.is_dir():
        if not (path / "ct.nii.gz").is_file():
            raise DataError(f"{path}: no ct.nii.gz in this folder; expected a sample or phantom subject folder "
                            "or a NIfTI CT file")  # fmt: skip
        ref = _sample_ref(path)
    elif path.is_file():
        if _nifti_stem(path) is None:
            raise DataError(f"{path}: expected a NIfTI CT file (.nii or .nii.gz) or a sample folder")
        ref = VolumeRef(_nifti_stem(path) or path.name, str(path), ct=path)
    else:
        raise DataError(f"{path}: no such volume file or folder")
    ref.masks.update(masks)
    return ref


def _cache_affine(cached: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The array's grid affine from the subject's meta.json (a 1 mm grid centred at 0 if absent)."""
    try:
        meta = json.loads((cached.parent / META_FILE).read_text(encoding="utf-8"))
        affine = np.asarray(meta["lr_affine" if cached.name == LR_FILE else "affine"], float)
        if affine.shape == (4, 4):
            return affine
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return spacing_affine(1.0, shape)


def load_volume(ref: VolumeRef) -> Volume:
    """Read the voxels of `ref`. Raises `DataError` naming the file when it cannot be read or is
    inconsistent (masks of another shape than the CT, a cached array that is not 4 x 3-D)."""
    if ref.cached is not None:
        array = np.asarray(load_array(ref.cached), dtype=np.float32)
        if array.ndim != 4 or array.shape[0] != len(CHANNELS):
            raise DataError(
                f"{ref.cached}: expected a ({len(CHANNELS)}, X, Y, Z) cached array, got {array.shape}"
            )
        decoded = decode_volume(array)
        hu = decoded.pop("ct").astype(np.float32)
        return Volume(
            hu, _cache_affine(ref.cached, hu.shape), {k: v.astype(np.uint8) for k, v in decoded.items()}
        )
    hu, affine = load_nifti(ref.ct)
    masks = {}
    for name, mask_path in ref.masks.items():
        mask, _ = load_nifti(mask_path, np.float32)
        if mask.shape != hu.shape:
            raise DataError(f"{mask_path}: {name} mask of shape {mask.shape}, but the CT is {hu.shape}")
        masks[name] = np.rint(mask).astype(np.uint8)
    if not np.isfinite(hu).all():
        raise DataError(f"{ref.ct}: the CT has NaN or infinite voxels")
    return Volume(hu.astype(np.float32), affine, masks)


def read_truth(ref: VolumeRef) -> dict | None:
    """A phantom's truth.json, or None."""
    if ref.truth is None:
        return None
    try:
        return json.loads(ref.truth.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{ref.truth}: cannot read the phantom's ground truth ({err})") from err
