"""The radiograph cache: one 2D frontal image per subject, its report and, where known, finding labels.

Layout of a radiograph cache directory `DIR` (written by `medsyn drr` and `medsyn prepare --cxr`):

    DIR/<id>/image.npy    float16 (1, S, S): the radiograph in [-1, 1] (display window applied: -1 black,
                          +1 white; bone and fluid bright, lung dark, as a chest film is read)
    DIR/<id>/meta.json    id, source, kind ("drr" or "radiograph"), size, spacing_mm, report sections,
                          labels ({"effusion": none|left|right|bilateral, "cardiomegaly": bool}) when known
    DIR/<id>/report.txt   "Findings: ...\\n\\nImpression: ..."
    DIR/manifest.csv      one row per finished subject (MANIFEST_COLUMNS); `image` relative to DIR;
                          `encoding` is ENCODING; empty `effusion` / `cardiomegaly` cells: not known
    DIR/failed.csv        id, source, reason for each subject the last run could not prepare

Subjects are written atomically (a temporary folder renamed when complete), as in `medsyn.data.cache`,
and share its id rules, split hashing and failed.csv.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from medsyn.data.cache import (
    CACHE_DTYPE,
    FAILED_FILE,
    MANIFEST_FILE,
    META_FILE,
    REPORT_FILE,
    _write_csv,
    finished_subjects,
    id_problem,
    read_meta,
    report_file,
    split_for,
    write_failed,
)
from medsyn.errors import DataError
from medsyn.io import atomic_dir, write_json, write_text

IMAGE_FILE = "image.npy"
ENCODING = "radiograph-1"
KINDS = ("drr", "radiograph")
EFFUSION_LABELS = ("none", "left", "right", "bilateral")
MANIFEST_COLUMNS = (
    "id",
    "image",
    "findings",
    "impression",
    "split",
    "size",
    "spacing_mm",
    "source",
    "kind",
    "effusion",
    "cardiomegaly",
    "encoding",
)

__all__ = [
    "ENCODING",
    "FAILED_FILE",
    "IMAGE_FILE",
    "MANIFEST_FILE",
    "check_labels",
    "finished_subjects",
    "load_image",
    "read_radiograph_manifest",
    "write_failed",
    "write_radiograph",
    "write_radiograph_manifest",
]


def check_labels(labels: dict | None, where: str) -> dict | None:
    """`labels` checked: None, or {"effusion": one of EFFUSION_LABELS or None, "cardiomegaly": bool or None}."""
    if labels is None:
        return None
    effusion, cardiomegaly = labels.get("effusion"), labels.get("cardiomegaly")
    if effusion is not None and effusion not in EFFUSION_LABELS:
        raise DataError(f"{where}: effusion label {effusion!r}; expected one of {EFFUSION_LABELS}")
    if cardiomegaly is not None and not isinstance(cardiomegaly, bool):
        raise DataError(f"{where}: cardiomegaly label {cardiomegaly!r}; expected true or false")
    return {"effusion": effusion, "cardiomegaly": cardiomegaly}


def write_radiograph(
    root: str | os.PathLike, subject_id: str, image: np.ndarray, meta: dict, overwrite: bool = False
) -> Path:
    """Write one subject atomically. `image`: (S, S) or (1, S, S) in [-1, 1]; `meta` must hold `findings`,
    `impression` and `kind`; `labels` is optional."""
    problem = id_problem(subject_id)
    if problem:
        raise DataError(f"subject id {subject_id!r} {problem}")
    image = np.asarray(image)
    image = image[None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[0] != 1 or image.shape[1] != image.shape[2]:
        raise DataError(f"{subject_id}: image of shape {image.shape}; expected (S, S) or (1, S, S)")
    if not np.isfinite(image).all():
        raise DataError(f"{subject_id}: image has NaN or infinite values")
    if meta.get("kind") not in KINDS:
        raise DataError(f"{subject_id}: kind {meta.get('kind')!r}; expected one of {KINDS}")
    labels = check_labels(meta.get("labels"), subject_id)
    meta = {**meta, "id": subject_id, "size": int(image.shape[-1]), "labels": labels, "encoding": ENCODING}
    target = Path(root) / subject_id
    with atomic_dir(target, overwrite=overwrite) as tmp:
        np.save(tmp / IMAGE_FILE, np.clip(image, -1.0, 1.0).astype(CACHE_DTYPE))
        write_json(tmp / META_FILE, meta)
        write_text(tmp / REPORT_FILE, report_file(meta["findings"], meta["impression"]))
    return target


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_radiograph_manifest(root: str | os.PathLike, fractions=(0.8, 0.1, 0.1)) -> list[dict]:
    """(Re)write DIR/manifest.csv from the finished subjects on disk; return its rows.

    Splits hash the subject id as in the CT cache, so a DRR of a phantom lands in the split its CT is in.
    """
    rows = []
    for subject_id in finished_subjects(root):
        meta = read_meta(root, subject_id)
        if meta.get("encoding") != ENCODING:
            raise DataError(
                f"{Path(root) / subject_id / META_FILE}: encoding {meta.get('encoding')!r}; expected "
                f"{ENCODING!r} (is this a CT cache? radiograph caches are written by `medsyn drr`)"
            )
        labels = meta.get("labels") or {}
        rows.append(
            {
                "id": subject_id,
                "image": f"{subject_id}/{IMAGE_FILE}",
                "findings": meta.get("findings", ""),
                "impression": meta.get("impression", ""),
                "split": split_for(subject_id, fractions),
                "size": meta.get("size", ""),
                "spacing_mm": _cell(meta.get("spacing_mm")),
                "source": meta.get("source", ""),
                "kind": meta.get("kind", ""),
                "effusion": _cell(labels.get("effusion")),
                "cardiomegaly": _cell(labels.get("cardiomegaly")),
                "encoding": ENCODING,
            }
        )
    _write_csv(Path(root) / MANIFEST_FILE, MANIFEST_COLUMNS, rows)
    return rows


def read_radiograph_manifest(root: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of DIR/manifest.csv (`image` resolved to an absolute path; `cardiomegaly` a bool or None,
    `effusion` a label or None), only `split`'s when given."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: no radiograph manifest; run `medsyn drr --out {root}` first")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and rows[0].get("encoding") != ENCODING:
        found = rows[0].get("encoding") or "none"
        raise DataError(
            f"{path}: encoding {found!r}; expected a radiograph cache ({ENCODING!r}, from `medsyn drr`)"
        )
    missing = [c for c in ("id", "image", "findings", "impression", "split") if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    for row in rows:
        row["image"] = str(path.parent / row["image"])
        row["effusion"] = row.get("effusion") or None
        row["cardiomegaly"] = {"true": True, "false": False}.get(row.get("cardiomegaly") or "")
    return [r for r in rows if split is None or r["split"] == split]


def load_image(row_or_path: dict | str | os.PathLike) -> np.ndarray:
    """The (1, S, S) float32 image of a manifest row (or an image.npy path)."""
    path = row_or_path["image"] if isinstance(row_or_path, dict) else row_or_path
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read cached image ({err})") from err
