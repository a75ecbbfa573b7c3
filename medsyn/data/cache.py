"""The prepared-data cache: memory-mappable arrays per subject and a manifest with splits.

Layout of a cache directory `DIR`:

    DIR/<id>/hr.npy       float16 (4, S, S, S): ct, lobes, airway, vessels in the diffusion range [-1, 1]
    DIR/<id>/lr.npy       float16 (4, S/f, S/f, S/f): hr.npy averaged over f^3 blocks (lobes: the most
                          frequent label; `medsyn.data.channels.downsample`, f = 4)
    DIR/<id>/meta.json    id, source, affines of both grids, spacing, backend, report sections
    DIR/<id>/report.txt   "Findings: ...\\n\\nImpression: ..."
    DIR/manifest.csv      one row per finished subject (MANIFEST_COLUMNS); paths relative to DIR; its
                          `encoding` column names the channel convention (`channels.ENCODING`)
    DIR/failed.csv        id, source, reason for each subject the last run could not prepare

A subject directory is written under a temporary name and renamed when complete, so a directory with
the subject's name is always finished; that is what makes `prepare` resumable.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medsyn.data import channels
from medsyn.errors import ConfigError, DataError
from medsyn.io import atomic_dir, atomic_path, write_json, write_text

HR_FILE, LR_FILE, META_FILE, REPORT_FILE = "hr.npy", "lr.npy", "meta.json", "report.txt"
MANIFEST_FILE, FAILED_FILE = "manifest.csv", "failed.csv"
MANIFEST_COLUMNS = (
    "id",
    "hr",
    "lr",
    "findings",
    "impression",
    "split",
    "size",
    "lr_size",
    "spacing_mm",
    "source",
    "encoding",
)
FAILED_COLUMNS = ("id", "source", "reason")
SPLITS = ("train", "val", "test")
CACHE_DTYPE = np.float16
MAX_ID_BYTES = 200  # a folder name, plus the temporary name's prefix and suffix, within 255 bytes


def id_problem(subject_id: str) -> str:
    """Why `subject_id` cannot name a folder directly inside the cache ('' when it can).

    Every subject id passes here (the readers, `write_subject`), so no id can write outside the cache.
    """
    if not subject_id:
        return "is empty"
    if "/" in subject_id or "\\" in subject_id:
        return "contains a path separator; expected a plain folder name"
    if subject_id.startswith("."):
        return "starts with '.'; expected a plain folder name (not hidden, not '..')"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in subject_id):
        return "contains a control character or bytes that are not UTF-8"
    if len(subject_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return ""


def downsample(hr: np.ndarray, factor: int = 4) -> np.ndarray:
    """The base-resolution stack of a 4-channel hr stack: block means, lobes by majority (MedSyn took
    every f-th voxel, which turns thin vessels, ribs and lobe borders into aliased specks)."""
    return channels.downsample(hr, factor, channels.CHANNELS)


def encoding_problem(where: str | os.PathLike, encoding: str | None) -> str:
    """'' when `encoding` is the current channel convention, else the one-line reason to refuse the data."""
    if encoding == channels.ENCODING:
        return ""
    found = f"channel encoding {encoding!r}" if encoding else "no channel encoding recorded (medsyn-1)"
    return (
        f"{where}: prepared with {found}; this medsyn reads {channels.ENCODING!r} (lobe levels and block-mean "
        "base grid changed). Prepare the data again into a new folder (`medsyn prepare ... --out NEW`)"
    )


def split_for(subject_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), salt: str = "medsyn") -> str:
    """train / val / test from a hash of the id: stable across runs, machines and subject order."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or sum(fractions) <= 0:
        raise ConfigError(f"split fractions {list(fractions)}: expected three non-negative numbers")
    digest = hashlib.sha256(f"{salt}:{subject_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * sum(fractions)
    edges = np.cumsum(fractions)
    return SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]


def is_done(root: str | os.PathLike, subject_id: str) -> bool:
    """True when the subject's directory exists (it is only ever created complete)."""
    return (Path(root) / subject_id / META_FILE).is_file()


def report_file(findings: str, impression: str) -> str:
    """The contents of `report.txt`: `Findings: ...` and `Impression: ...` paragraphs."""
    return f"Findings: {findings}\n\nImpression: {impression}\n"


def write_subject(
    root: str | os.PathLike,
    subject_id: str,
    hr: np.ndarray,
    lr: np.ndarray,
    meta: dict,
    overwrite: bool = False,
) -> Path:
    """Write one subject atomically; `meta` must hold `findings` and `impression`. The arrays are taken to
    be in the current channel convention unless `meta["encoding"]` says otherwise."""
    meta = {**meta, "encoding": meta.get("encoding", channels.ENCODING)}
    problem = id_problem(subject_id)
    if problem:
        raise DataError(f"subject id {subject_id!r} {problem}")
    target = Path(root) / subject_id
    with atomic_dir(target, overwrite=overwrite) as tmp:
        np.save(tmp / HR_FILE, np.asarray(hr, dtype=CACHE_DTYPE))
        np.save(tmp / LR_FILE, np.asarray(lr, dtype=CACHE_DTYPE))
        write_json(tmp / META_FILE, meta)
        write_text(tmp / REPORT_FILE, report_file(meta["findings"], meta["impression"]))
    return target


def read_meta(root: str | os.PathLike, subject_id: str) -> dict:
    """The subject's meta.json."""
    path = Path(root) / subject_id / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read subject metadata ({err})") from err


def load_array(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Open a cached array, memory-mapped by default (nothing is read until it is indexed)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read cached array ({err})") from err


def finished_subjects(root: str | os.PathLike) -> list[str]:
    """Ids of all finished subjects in the cache (temporary directories start with a dot)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / META_FILE).is_file())


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_manifest(root: str | os.PathLike, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[dict]:
    """(Re)write DIR/manifest.csv from the finished subjects on disk; return its rows."""
    rows = []
    for subject_id in finished_subjects(root):
        meta = read_meta(root, subject_id)
        problem = encoding_problem(Path(root) / subject_id / META_FILE, meta.get("encoding"))
        if problem:
            raise DataError(problem)
        rows.append(
            {
                "id": subject_id,
                "hr": f"{subject_id}/{HR_FILE}",
                "lr": f"{subject_id}/{LR_FILE}",
                "findings": meta.get("findings", ""),
                "impression": meta.get("impression", ""),
                "split": split_for(subject_id, fractions),
                "size": meta.get("size", ""),
                "lr_size": meta.get("lr_size", ""),
                "spacing_mm": meta.get("spacing_mm", ""),
                "source": meta.get("source", ""),
                "encoding": meta["encoding"],
            }
        )
    _write_csv(Path(root) / MANIFEST_FILE, MANIFEST_COLUMNS, rows)
    return rows


def write_failed(root: str | os.PathLike, failures: Iterable[dict]) -> None:
    """Write DIR/failed.csv (id, source, reason)."""
    _write_csv(Path(root) / FAILED_FILE, FAILED_COLUMNS, failures)


def read_cache_manifest(root: str | os.PathLike) -> list[dict]:
    """Rows of DIR/manifest.csv with `hr` / `lr` resolved to absolute paths."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: no cache manifest; run `medsyn prepare --out {root}` first")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("id", "hr", "lr", "findings", "impression", "split") if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    problem = encoding_problem(path, rows[0].get("encoding")) if rows else ""
    if problem:
        raise DataError(problem)
    for row in rows:
        row["hr"], row["lr"] = str(path.parent / row["hr"]), str(path.parent / row["lr"])
    return rows
