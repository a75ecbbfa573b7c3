"""Input layouts for `medsyn prepare`: a generic manifest CSV, the CT-RATE layout, and DICOM series.

A reader turns an input into `Subject` records (paths and report text, nothing loaded), so that
`prepare` can validate and load each subject inside its own worker and record failures per subject.

Generic manifest CSV: columns `id, ct, lobes, airway, vessels, findings, impression`; paths are
relative to the CSV's folder; mask cells may be empty. A `ct` path may be a NIfTI file or a folder
holding one DICOM series.

CT-RATE layout: a directory is recognised as CT-RATE when some CSV below it (up to three levels deep)
has the report columns `VolumeName, Findings_EN, Impressions_EN`. CSVs below it that have the columns
`VolumeName, RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing` give the metadata. Volumes are found
anywhere below the directory by file name (`VolumeName`, e.g. `train_1_a_1.nii.gz`); the subject id
is the file name without `.nii.gz`.
"""

from __future__ import annotations

import ast
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsyn.data.channels import MASK_CHANNELS
from medsyn.data.nifti import load_nifti
from medsyn.errors import DataError, MedsynError

MANIFEST_COLUMNS: tuple[str, ...] = ("id", "ct", "lobes", "airway", "vessels", "findings", "impression")
CTRATE_REPORT_COLUMNS: tuple[str, ...] = ("VolumeName", "Findings_EN", "Impressions_EN")
CTRATE_META_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "RescaleSlope",
    "RescaleIntercept",
    "XYSpacing",
    "ZSpacing",
)
_SEARCH_DEPTH = 3


@dataclass
class Subject:
    """One input subject: where its CT and masks are, its report, and CT-RATE metadata if any.

    `source` names the CSV file and row it came from, for error messages.
    """

    id: str
    ct: Path
    findings: str = ""
    impression: str = ""
    masks: dict[str, Path] = field(default_factory=dict)
    source: str = ""
    rescale: tuple[float, float] | None = None  # (slope, intercept) to apply to stored values
    spacing: tuple[float, float, float] | None = None  # voxel size (mm) overriding the file's

    def check(self) -> None:
        """Raise `DataError` (naming file, row and column) if a file or the report is missing."""
        for column, path in [("ct", self.ct), *self.masks.items()]:
            if not path.exists():
                raise DataError(f"{self.source}, column '{column}': no such file or folder {path}")
        if not self.findings.strip() and not self.impression.strip():
            raise DataError(f"{self.source}: missing report (both findings and impression are empty)")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read CSV ({err})") from err


def read_manifest(path: str | os.PathLike, check: bool = True) -> list[Subject]:
    """Read a generic manifest CSV into subjects; with `check`, every row's files and report must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    columns, rows = _read_csv(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in columns and c not in MASK_CHANNELS]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    base, subjects, seen = path.parent, [], {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        source = f"{path} row {line}"
        sid = (row.get("id") or "").strip()
        if not sid:
            raise DataError(f"{source}, column 'id': empty id")
        if sid in seen:
            raise DataError(f"{source}, column 'id': duplicate id {sid!r} (first at row {seen[sid]})")
        if "/" in sid or "\\" in sid or sid.startswith("."):
            raise DataError(f"{source}, column 'id': {sid!r} is not usable as a folder name")
        seen[sid] = line
        ct = (row.get("ct") or "").strip()
        if not ct:
            raise DataError(f"{source}, column 'ct': empty path")
        masks = {c: base / row[c].strip() for c in MASK_CHANNELS if (row.get(c) or "").strip()}
        subject = Subject(
            id=sid,
            ct=base / ct,
            findings=(row.get("findings") or "").strip(),
            impression=(row.get("impression") or "").strip(),
            masks=masks,
            source=source,
        )
        if check:
            subject.check()
        subjects.append(subject)
    return subjects


def _find_csvs(root: Path, columns: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= _SEARCH_DEPTH:
            dirnames[:] = []
        for name in sorted(filenames):
            if name.lower().endswith(".csv"):
                with open(Path(dirpath) / name, newline="", encoding="utf-8-sig") as f:
                    header = next(csv.reader(f), [])
                if all(c in header for c in columns):
                    found.append(Path(dirpath) / name)
    return sorted(found)


def _parse_spacing(text: str, source: str) -> tuple[float, float]:
    try:
        value = ast.literal_eval(text.strip())
        xy = [float(v) for v in (value if isinstance(value, list | tuple) else [value, value])]
    except (ValueError, SyntaxError, TypeError) as err:
        raise DataError(f"{source}, column 'XYSpacing': cannot parse {text!r} as [x, y]") from err
    if len(xy) != 2:
        raise DataError(f"{source}, column 'XYSpacing': expected two values, got {text!r}")
    return xy[0], xy[1]


def _strip_nii(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_ctrate_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a CT-RATE reports CSV."""
    path = Path(path)
    return path.is_dir() and bool(_find_csvs(path, CTRATE_REPORT_COLUMNS))


def read_ctrate(root: str | os.PathLike, check: bool = True) -> list[Subject]:
    """Read a CT-RATE directory (reports CSV(s), metadata CSV(s), volumes anywhere below) into subjects."""
    root = Path(root)
    report_csvs = _find_csvs(root, CTRATE_REPORT_COLUMNS)
    if not report_csvs:
        raise DataError(f"{root}: no reports CSV with columns {list(CTRATE_REPORT_COLUMNS)} found")
    meta: dict[str, tuple[tuple[float, float], tuple[float, float, float]]] = {}
    for meta_csv in _find_csvs(root, CTRATE_META_COLUMNS):
        for line, row in enumerate(_read_csv(meta_csv)[1], start=2):
            source = f"{meta_csv} row {line}"
            try:
                rescale = (float(row["RescaleSlope"]), float(row["RescaleIntercept"]))
                z = float(row["ZSpacing"])
            except ValueError as err:
                raise DataError(f"{source}: bad rescale or spacing value ({err})") from err
            xy = _parse_spacing(row["XYSpacing"], source)
            meta[row["VolumeName"].strip()] = (rescale, (xy[0], xy[1], z))
    volumes = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.endswith((".nii.gz", ".nii")):
                volumes.setdefault(name, Path(dirpath) / name)
    subjects, seen = [], set()
    for report_csv in report_csvs:
        for line, row in enumerate(_read_csv(report_csv)[1], start=2):
            name = (row.get("VolumeName") or "").strip()
            source = f"{report_csv} row {line}"
            if not name:
                raise DataError(f"{source}, column 'VolumeName': empty")
            sid = _strip_nii(name)
            if sid in seen:
                continue
            seen.add(sid)
            rescale, spacing = meta.get(name, (None, None))
            subject = Subject(
                id=sid,
                ct=volumes.get(name, root / name),
                findings=(row.get("Findings_EN") or "").strip(),
                impression=(row.get("Impressions_EN") or "").strip(),
                source=f"{source} (column 'VolumeName')",
                rescale=rescale,
                spacing=spacing,
            )
            if check:
                subject.check()
            subjects.append(subject)
    return subjects


def read_input(path: str | os.PathLike, check: bool = True) -> list[Subject]:
    """Read a manifest CSV file or a CT-RATE directory, whichever `path` is."""
    path = Path(path)
    if path.is_file():
        return read_manifest(path, check=check)
    if path.is_dir():
        return read_ctrate(path, check=check)
    raise DataError(f"{path}: no such manifest CSV or CT-RATE directory")


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the largest DICOM series in `folder`; return `(HU array (i, j, k), RAS affine)`.

    Slices are ordered along the slice normal; RescaleSlope/Intercept are applied per slice.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as err:  # pragma: no cover - pydicom is a dependency
        raise MedsynError("reading DICOM needs pydicom: pip install pydicom") from err
    folder = Path(folder)
    series: dict[str, list] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not series:
        raise DataError(f"{folder}: no DICOM image slices with position and orientation found")
    slices = max(series.values(), key=len)
    if len(slices) < 2:
        raise DataError(f"{folder}: expected a 3-D series, found a single slice")
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]  # directions of increasing column / row index (LPS)
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))
    try:
        planes = [
            ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1.0))
            + float(ds.get("RescaleIntercept", 0.0))
            for ds in slices
        ]
        volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i=col, j=row, k)
    except Exception as err:  # pydicom raises many types for truncated or compressed pixel data
        raise DataError(f"{folder}: cannot decode DICOM pixel data ({type(err).__name__}: {err})") from err
    first = np.asarray(slices[0].ImagePositionPatient, dtype=np.float64)
    last = np.asarray(slices[-1].ImagePositionPatient, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm
    lps[:3, 1] = col_dir * row_mm
    lps[:3, 2] = (last - first) / (len(slices) - 1)
    lps[:3, 3] = first
    return volume, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def load_volume(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file or a DICOM series folder; return `(array (i, j, k), RAS affine)`."""
    path = Path(path)
    if path.is_dir():
        volume, affine = read_dicom_series(path)
        return volume.astype(dtype, copy=False), affine
    return load_nifti(path, dtype=dtype)
