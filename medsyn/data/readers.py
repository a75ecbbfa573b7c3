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

Both layouts pass every id through `check_id` (the cache's rule: one plain folder name), so no row can
place a subject outside the cache. A row whose cells are not UTF-8 becomes a subject carrying that
error, so that `prepare` lists it in `failed.csv` and goes on. `open_volume` reads a volume's header
alone and refuses one that claims too many voxels or more data than its file holds, before any read.
"""

from __future__ import annotations

import ast
import csv
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsyn.data.cache import id_problem
from medsyn.data.channels import MASK_CHANNELS
from medsyn.data.nifti import open_nifti, read_nifti, stored_bytes, volume_shape
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
MAX_VOXELS = 1024**3  # a header claiming more is refused before any voxel is read (--max-voxels)
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept as surrogate escapes


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
    error: str = ""  # why the row itself is unusable (e.g. not UTF-8), raised by `check`

    def check(self) -> None:
        """Raise `DataError` (naming file, row and column) for a bad row, a missing file or report."""
        if self.error:
            raise DataError(self.error)
        for column, path in [("ct", self.ct), *self.masks.items()]:
            if not path.exists():
                raise DataError(f"{self.source}, column '{column}': no such file or folder {path}")
        if not self.findings.strip() and not self.impression.strip():
            raise DataError(f"{self.source}: missing report (both findings and impression are empty)")


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows; bytes that are not UTF-8 stay as surrogate escapes, for `row_error` to report
    per row, so that one bad report does not reject the whole file."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, csv.Error) as err:
        raise DataError(f"{path}: cannot read CSV ({err})") from err


def row_error(row: dict, source: str) -> str:
    """A one-line reason when a cell of `row` is not valid UTF-8, else ''."""
    for column, value in row.items():
        match = _UNDECODED.search(value) if isinstance(value, str) else None
        if match:
            byte = ord(match.group()) - 0xDC00
            reason = f"not valid UTF-8 text (byte 0x{byte:02x}); save the CSV as UTF-8"
            return f"{source}, column '{column}': {reason}"
    return ""


def check_id(subject_id: str, source: str, column: str) -> str:
    """Return `subject_id` if it can name a cache folder, else raise `DataError` naming the row and column.

    Both readers call this, so no input layout can place a subject outside the cache.
    """
    problem = id_problem(subject_id)
    if problem:
        raise DataError(f"{source}, column '{column}': id {subject_id!r} {problem}")
    return subject_id


def read_manifest(path: str | os.PathLike, check: bool = True) -> list[Subject]:
    """Read a generic manifest CSV into subjects; with `check`, every row's files and report must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    columns, rows = read_csv_rows(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in columns and c not in MASK_CHANNELS]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    base, subjects, seen = path.parent, [], {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        source = f"{path} row {line}"
        sid = check_id((row.get("id") or "").strip(), source, "id")
        if sid in seen:
            raise DataError(f"{source}, column 'id': duplicate id {sid!r} (first at row {seen[sid]})")
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
            error=row_error(row, source),
        )
        if check:
            subject.check()
        subjects.append(subject)
    return subjects


def find_csvs(root: Path, columns: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= _SEARCH_DEPTH:
            dirnames[:] = []
        for name in sorted(filenames):
            if name.lower().endswith(".csv"):
                try:
                    with open(Path(dirpath) / name, newline="", encoding="utf-8-sig", errors="replace") as f:
                        header = next(csv.reader(f), [])
                except (OSError, csv.Error) as err:
                    raise DataError(f"{Path(dirpath) / name}: cannot read CSV ({err})") from err
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
    return path.is_dir() and bool(find_csvs(path, CTRATE_REPORT_COLUMNS))


def read_ctrate(root: str | os.PathLike, check: bool = True) -> list[Subject]:
    """Read a CT-RATE directory (reports CSV(s), metadata CSV(s), volumes anywhere below) into subjects."""
    root = Path(root)
    report_csvs = find_csvs(root, CTRATE_REPORT_COLUMNS)
    if not report_csvs:
        raise DataError(f"{root}: no reports CSV with columns {list(CTRATE_REPORT_COLUMNS)} found")
    meta: dict[str, tuple[tuple[float, float], tuple[float, float, float]]] = {}
    for meta_csv in find_csvs(root, CTRATE_META_COLUMNS):
        for line, row in enumerate(read_csv_rows(meta_csv)[1], start=2):
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
        for line, row in enumerate(read_csv_rows(report_csv)[1], start=2):
            name = (row.get("VolumeName") or "").strip()
            source = f"{report_csv} row {line}"
            sid = check_id(_strip_nii(name), source, "VolumeName")
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
                error=row_error(row, source),
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


@dataclass(frozen=True)
class Volume:
    """A CT or mask whose header has been read and checked; `read()` loads its voxels (i, j, k)."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm
    reader: Callable[..., np.ndarray] = field(repr=False)

    def read(self, dtype=np.float32) -> np.ndarray:
        return self.reader(dtype)


def _check_claim(
    path: Path, shape: tuple[int, ...], bytes_per_voxel: float, held: int | None, max_voxels: int
) -> None:
    """Refuse a header claiming more than `max_voxels` voxels, or more voxel data than the file holds
    (`held`, None when only decompression would tell), before anything is allocated for it."""
    voxels = math.prod(shape)
    dims = "x".join(str(s) for s in shape)
    if voxels > max_voxels:
        raise DataError(
            f"{path}: header claims {dims} = {voxels:,} voxels, more than the limit of {max_voxels:,}"
            " (--max-voxels)"
        )
    claimed = math.ceil(voxels * bytes_per_voxel)
    if held is not None and held < claimed:
        raise DataError(
            f"{path}: header claims {dims} voxels ({claimed:,} bytes) but the file holds {held:,} bytes"
            " of voxel data; truncated or corrupt"
        )


def _open_nifti(path: Path, max_voxels: int) -> Volume:
    image = open_nifti(path)
    _check_claim(path, tuple(image.shape), image.get_data_dtype().itemsize, stored_bytes(image), max_voxels)
    return Volume(
        path,
        volume_shape(path, image.shape),
        np.asarray(image.affine, dtype=np.float64),
        lambda dtype: read_nifti(image, dtype),
    )


def _open_dicom_series(folder: Path, max_voxels: int) -> Volume:
    """The largest DICOM series in `folder`, slices ordered along the slice normal; pixel data is decoded
    (RescaleSlope/Intercept applied per slice) only by `read()`."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as err:  # pragma: no cover - pydicom is a dependency
        raise MedsynError("reading DICOM needs pydicom: pip install pydicom") from err
    series: dict[str, list] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if all(
            k in ds
            for k in ("PixelData", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient")
        ):
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not series:
        raise DataError(f"{folder}: no DICOM image slices with position and orientation found")
    slices = max(series.values(), key=len)
    if len(slices) < 2:
        raise DataError(f"{folder}: expected a 3-D series, found a single slice")
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    if any((int(ds.Rows), int(ds.Columns)) != (rows, cols) for ds in slices):
        raise DataError(
            f"{folder}: slices of one series differ in rows x columns; expected {rows}x{cols} throughout"
        )
    if any(int(ds.get("NumberOfFrames", 1) or 1) != 1 for ds in slices):
        raise DataError(f"{folder}: multi-frame DICOM files are not supported; expected one image per file")
    syntax = getattr(getattr(slices[0], "file_meta", None), "TransferSyntaxUID", None)
    compressed = syntax is not None and syntax.is_compressed
    bytes_per_voxel = (
        int(slices[0].get("SamplesPerPixel", 1) or 1) * int(slices[0].get("BitsAllocated", 16) or 16) / 8
    )
    held = None if compressed else sum(len(ds.PixelData) for ds in slices)
    shape = (cols, rows, len(slices))  # (i = column, j = row, k = slice)
    _check_claim(folder, shape, bytes_per_voxel, held, max_voxels)
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]  # directions of increasing column / row index (LPS)
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))
    first = np.asarray(slices[0].ImagePositionPatient, dtype=np.float64)
    last = np.asarray(slices[-1].ImagePositionPatient, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm
    lps[:3, 1] = col_dir * row_mm
    lps[:3, 2] = (last - first) / (len(slices) - 1)
    lps[:3, 3] = first

    def read(dtype) -> np.ndarray:
        try:
            planes = [
                ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1.0))
                + float(ds.get("RescaleIntercept", 0.0))
                for ds in slices
            ]
            volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i=col, j=row, k)
        except Exception as err:  # pydicom raises many types for truncated or compressed pixel data
            reason = " ".join(str(err).split())
            raise DataError(
                f"{folder}: cannot decode DICOM pixel data ({type(err).__name__}: {reason})"
            ) from err
        return volume.astype(dtype, copy=False)

    return Volume(folder, shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, read)


def open_volume(path: str | os.PathLike, max_voxels: int = MAX_VOXELS) -> Volume:
    """Open a NIfTI file or a DICOM series folder by its header alone; no voxel is read until `read()`.

    Refused with `DataError` before any allocation: a header claiming more than `max_voxels` voxels,
    an uncompressed file holding less voxel data than its header claims, a shape that is not 3-D.
    """
    path = Path(path)
    return _open_dicom_series(path, max_voxels) if path.is_dir() else _open_nifti(path, max_voxels)


def load_volume(
    path: str | os.PathLike, dtype=np.float32, max_voxels: int = MAX_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file or a DICOM series folder; return `(array (i, j, k), RAS affine)`."""
    volume = open_volume(path, max_voxels)
    return volume.read(dtype), volume.affine
