"""Inputs of a radiograph cache: real radiographs with reports, and CT volumes to project (`medsyn drr`).

Real radiographs (`medsyn prepare --cxr --input X`), two layouts:

- A CSV with columns `image` (a PNG, JPEG or DICOM file, relative to the CSV's folder) and `findings`,
  `impression` or a free-text `report` (split at its FINDINGS: / IMPRESSION: headings); optional `id`
  (default: the image path without its suffix, "/" -> "_") and label columns `effusion`
  (none/left/right/bilateral) and `cardiomegaly` (true/false); an empty label cell is read from the report.
- The MIMIC-CXR layout: free-text reports `.../p10/p10000032/s50414267.txt` and image folders
  `.../p10/p10000032/s50414267/*.dcm` (or .jpg / .png) anywhere below the input folder (the reports and
  the images may sit in separate trees, as mimic-cxr-reports/ and mimic-cxr-jpg/ do). Each study's report
  goes with its frontal image: DICOM ViewPosition PA, else AP (for JPEG/PNG the view comes from a
  metadata CSV with columns dicom_id, ViewPosition below the input, when there is one), else the first
  image. The subject id is `p10000032_s50414267`.

Images are decoded to the display range [0, 1] (0 black): DICOM through its modality LUT (rescale) and
VOI window (WindowCenter / WindowWidth, LINEAR or SIGMOID; without one, the 0.5 and 99.5 percentiles),
MONOCHROME1 inverted; 8-bit PNG / JPEG as stored (they are display images already); 16-bit PNG by the
0.5 and 99.5 percentiles. A row or study that cannot be used becomes a subject carrying the reason, so
`prepare` lists it in failed.csv and goes on; a CSV without the needed columns is refused as a whole.

CT volumes for DRRs (`read_ct_sources`): a CT cache (from `medsyn prepare`), a phantoms folder (from
`medsyn phantom`: manifest.csv + <id>/ct.nii.gz, report.txt, truth.json), or a CT manifest CSV / CT-RATE
directory as `medsyn prepare` reads it. Nothing is loaded until `load_ct` runs in a worker.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsyn.data.cache import read_meta
from medsyn.data.channels import decode_ct
from medsyn.data.preprocess import apply_rescale, override_spacing
from medsyn.data.readers import (
    MAX_VOXELS,
    Subject,
    check_id,
    find_csvs,
    is_ctrate_dir,
    open_volume,
    read_csv_rows,
    read_input,
    row_error,
)
from medsyn.errors import DataError, MedsynError
from medsyn.radiograph.cache import EFFUSION_LABELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MAX_PIXELS = 100_000_000  # an image claiming more is refused before its pixels are decoded
PERCENTILES = (0.5, 99.5)  # display range of an image without a window of its own
FRONTAL_VIEWS = ("PA", "AP")  # preferred in this order
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&,()-]*?)[ \t]*:", re.MULTILINE)
_FINDINGS_HEADINGS = ("FINDINGS", "FINDINGS AND IMPRESSION")
_IMPRESSION_HEADINGS = ("IMPRESSION", "CONCLUSION", "IMPRESSIONS")
_PATIENT, _STUDY = re.compile(r"p\d+"), re.compile(r"s\d+")
_TRUE, _FALSE = ("true", "1", "yes", "y"), ("false", "0", "no", "n")


@dataclass
class RadiographSubject:
    """One real radiograph: candidate image files (the frontal one is picked when loaded), its report
    (text, or a report file read when loaded) and labels given by the input; `source` names the row."""

    id: str
    images: list[Path]
    source: str
    findings: str = ""
    impression: str = ""
    report: Path | None = None  # a free-text report file (MIMIC-CXR), read by `load_report`
    labels: dict = field(default_factory=dict)  # given labels ({"effusion": ..., "cardiomegaly": ...})
    views: dict[str, str] = field(default_factory=dict)  # image file stem -> ViewPosition (metadata CSV)
    error: str = ""  # why the row or study cannot be used


def split_report(text: str) -> tuple[str, str]:
    """(findings, impression) of a free-text report, from its FINDINGS: and IMPRESSION: (or CONCLUSION:)
    sections; a report without either heading is all findings. Whitespace is collapsed."""
    sections: dict[str, str] = {}
    matches = list(_HEADING.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.setdefault(match.group(1).strip(), " ".join(text[match.end() : end].split()))
    findings = next((sections[h] for h in _FINDINGS_HEADINGS if sections.get(h)), "")
    impression = next((sections[h] for h in _IMPRESSION_HEADINGS if sections.get(h)), "")
    if not set(sections) & {*_FINDINGS_HEADINGS, *_IMPRESSION_HEADINGS}:
        findings = " ".join(text.split())
    return findings, impression


def load_report(subject: RadiographSubject) -> tuple[str, str]:
    """The subject's (findings, impression); raises `DataError` when it has no report text."""
    findings, impression = subject.findings, subject.impression
    if subject.report is not None:
        try:
            text = subject.report.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{subject.report}: cannot read report ({err})") from err
        findings, impression = split_report(text)
    if not findings.strip() and not impression.strip():
        where = subject.report or subject.source
        raise DataError(f"{where}: missing report (no findings or impression text)")
    return findings, impression


def _parse_label(value: str, column: str, source: str):
    """A label cell -> its value (None when empty); raises `DataError` naming the row and column."""
    value = value.strip().lower()
    if not value:
        return None
    if column == "effusion":
        if value not in EFFUSION_LABELS:
            raise DataError(f"{source}, column 'effusion': {value!r}; expected one of {EFFUSION_LABELS}")
        return value
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise DataError(f"{source}, column 'cardiomegaly': {value!r}; expected true or false")


def _stem(path: Path) -> str:
    """A file name without its suffixes (`a.dcm` and `a.jpg` -> `a`, MIMIC-CXR's dicom_id)."""
    return path.name.split(".")[0] or path.name


def _image_id(image: str) -> str:
    """The default id of an image path: without its suffix, folders joined by '_'."""
    path = Path(image)
    return "_".join([p for p in path.parent.parts if p not in (".", "..", "/")] + [_stem(path)])


def read_cxr_csv(path: str | os.PathLike) -> list[RadiographSubject]:
    """Subjects of a radiograph CSV (see the module docstring). A CSV without an `image` column or
    without report columns is a `DataError` naming the file and the column."""
    path = Path(path)
    columns, rows = read_csv_rows(path)
    expected = "expected columns image, findings, impression (or report), optional id, effusion, cardiomegaly"
    if "image" not in columns:
        raise DataError(f"{path}: missing column 'image'; {expected}")
    if not {"findings", "impression", "report"} & set(columns):
        raise DataError(f"{path}: missing column 'findings' / 'impression' (or 'report'); {expected}")
    subjects, seen = [], {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        source = f"{path} row {line}"
        image = (row.get("image") or "").strip()
        if "id" in columns:
            sid = check_id((row.get("id") or "").strip(), source, "id")
        else:
            sid = check_id(_image_id(image) if image else f"row{line}", source, "image")
        if sid in seen:
            raise DataError(f"{source}: duplicate id {sid!r} (first at row {seen[sid]})")
        seen[sid] = line
        findings = (row.get("findings") or "").strip()
        impression = (row.get("impression") or "").strip()
        if not findings and not impression and (row.get("report") or "").strip():
            findings, impression = split_report(row["report"])
        subject = RadiographSubject(sid, [path.parent / image], source, findings, impression)
        subject.error = row_error(row, source) or ("" if image else f"{source}, column 'image': empty path")
        try:
            given = [c for c in ("effusion", "cardiomegaly") if c in columns and row.get(c) is not None]
            subject.labels = {c: _parse_label(row[c], c, source) for c in given}
        except DataError as err:
            subject.error = subject.error or str(err)
        subjects.append(subject)
    return subjects


def _view_metadata(root: Path) -> dict[str, str]:
    """dicom_id -> ViewPosition from MIMIC-CXR-JPG style metadata CSVs below `root` (empty when none)."""
    views = {}
    for meta_csv in find_csvs(root, ("dicom_id", "ViewPosition")):
        for row in read_csv_rows(meta_csv)[1]:
            views[(row.get("dicom_id") or "").strip()] = (row.get("ViewPosition") or "").strip().upper()
    return views


def read_mimic(root: str | os.PathLike) -> list[RadiographSubject]:
    """Subjects of a MIMIC-CXR style folder: every study with a report, or with images, below `root`;
    a study lacking either becomes a subject carrying that reason."""
    root = Path(root)
    reports: dict[tuple[str, str], Path] = {}
    images: dict[tuple[str, str], list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        for name in sorted(filenames):
            file = folder / name
            if _PATIENT.fullmatch(folder.name) and name.endswith(".txt") and _STUDY.fullmatch(name[:-4]):
                reports.setdefault((folder.name, name[:-4]), file)
            elif (
                name.lower().endswith(IMAGE_SUFFIXES)
                and _STUDY.fullmatch(folder.name)
                and _PATIENT.fullmatch(folder.parent.name)
            ):
                images.setdefault((folder.parent.name, folder.name), []).append(file)
    if not reports and not images:
        raise DataError(
            f"{root}: no MIMIC-CXR reports (pNN/pNNNNNNNN/sNNNNNNNN.txt) or image folders "
            "(pNN/pNNNNNNNN/sNNNNNNNN/*.dcm|.jpg|.png) found"
        )
    views = _view_metadata(root)
    subjects = []
    for key in sorted(set(reports) | set(images)):
        sid = check_id(f"{key[0]}_{key[1]}", str(reports.get(key) or images[key][0].parent), "study")
        report, found = reports.get(key), images.get(key, [])
        subject = RadiographSubject(sid, found, str(report or found[0].parent), report=report)
        subject.views = {_stem(p): views[_stem(p)] for p in found if _stem(p) in views}
        if report is None:
            subject.error = f"{found[0].parent}: study has images but no report {key[1]}.txt"
        elif not found:
            subject.error = f"{report}: no image folder {key[0]}/{key[1]}/ for this report"
        subjects.append(subject)
    return subjects


def read_cxr_input(path: str | os.PathLike) -> list[RadiographSubject]:
    """A radiograph CSV file or a MIMIC-CXR style folder, whichever `path` is."""
    path = Path(path)
    if path.is_file():
        return read_cxr_csv(path)
    if path.is_dir():
        return read_mimic(path)
    raise DataError(
        f"{path}: no such file or folder; expected a CSV (image, findings, impression) or a MIMIC-CXR"
        " folder (reports pNN/pNNNNNNNN/sNNNNNNNN.txt and their image folders)"
    )


# --- decoding images -----------------------------------------------------------------------------


def _percentile_range(image: np.ndarray, where: Path) -> np.ndarray:
    low, high = np.percentile(image, PERCENTILES)
    if not high > low:
        raise DataError(f"{where}: image is blank (one value throughout)")
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def _voi_window(image: np.ndarray, ds) -> np.ndarray | None:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1], or None when the file has none."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
    width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (image - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((image - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    if width < 1:
        return None
    return np.clip((image - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _read_dicom(path: Path) -> tuple[np.ndarray, float | None]:
    import pydicom

    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise DataError(f"{path}: header claims {rows}x{cols} pixels, more than the limit of {MAX_PIXELS:,}")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DataError(f"{path}: multi-frame DICOM; expected one radiograph per file")
    pixels = ds.pixel_array
    if pixels.ndim == 3:  # colour: average the samples
        pixels = pixels.mean(axis=-1)
    image = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    display = _voi_window(image, ds)
    display = _percentile_range(image, path) if display is None else display
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 1.0 - display  # MONOCHROME1: the highest value is black
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    return display.astype(np.float32), float(spacing[0]) if spacing else None


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:  # the header only; pixels are decoded below
        if im.width * im.height > MAX_PIXELS:
            raise DataError(f"{path}: {im.width}x{im.height} pixels, more than the limit of {MAX_PIXELS:,}")
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return _percentile_range(np.asarray(im, dtype=np.float32), path)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_radiograph(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Decode a radiograph file to (H, W) float32 in [0, 1] (0 black) and its pixel size in mm (None
    when the file does not say). Raises `DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    dicom = path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path)
    try:
        image, spacing = _read_dicom(path) if dicom else (_read_png(path), None)
    except MedsynError:
        raise
    except Exception as err:  # pydicom and PIL raise many types for truncated or foreign files
        kind = "DICOM" if dicom else "PNG/JPEG"
        raise DataError(
            f"{path}: cannot read as {kind} ({type(err).__name__}: {' '.join(str(err).split())})"
        ) from err
    if image.ndim != 2 or min(image.shape) < 2:
        raise DataError(f"{path}: expected a 2-D grayscale image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image has NaN or infinite values")
    return image, spacing


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_view(path: Path) -> str:
    """The ViewPosition of a DICOM file's header ('' when absent or not DICOM)."""
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("ViewPosition", "")).strip().upper()
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is decoded
        return ""


def frontal_image(subject: RadiographSubject) -> Path:
    """The subject's frontal image: PA, else AP (DICOM header or metadata CSV), else the first."""
    if len(subject.images) == 1:
        return subject.images[0]
    views = {}
    for path in subject.images:
        in_header = dicom_view(path) if path.suffix.lower() in (".dcm", ".dicom") else ""
        views[path] = subject.views.get(_stem(path)) or in_header
    for view in FRONTAL_VIEWS:
        for path in subject.images:
            if views[path] == view:
                return path
    return subject.images[0]


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) in [0, 1] -> (size, size) in [-1, 1]: padded to a square with black, centred, then resized
    (bilinear, antialiased)."""
    h, w = image.shape
    side = max(h, w)
    padded = torch.full((side, side), -1.0)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top : top + h, left : left + w] = torch.as_tensor(image, dtype=torch.float32) * 2.0 - 1.0
    out = F.interpolate(
        padded[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0, 0].clamp(-1.0, 1.0).numpy()


# --- CT volumes for DRRs -------------------------------------------------------------------------

CT_INPUTS = (
    "a CT cache (from `medsyn prepare`), a phantoms folder (from `medsyn phantom`) or a CT manifest CSV /"
    " CT-RATE directory as `medsyn prepare` reads it"
)


@dataclass
class CtSource:
    """One CT to project: a subject of a CT cache (`cache` set) or of a manifest (`subject` set)."""

    id: str
    source: str
    cache: Path | None = None  # the CT cache holding this subject
    subject: Subject | None = None  # the manifest / CT-RATE record


@dataclass
class CtScan:
    """A loaded CT: HU (i, j, k), its voxel-to-RAS affine, its report and, for a phantom, its truth file."""

    hu: np.ndarray
    affine: np.ndarray
    findings: str
    impression: str
    ct: str  # where the CT came from
    truth: Path | None


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            return next(csv.reader(f), [])
    except (OSError, csv.Error) as err:
        raise DataError(f"{path}: cannot read CSV ({err})") from err


def read_ct_sources(path: str | os.PathLike) -> list[CtSource]:
    """The CTs of a CT cache, a phantoms folder, a CT manifest CSV or a CT-RATE directory; `DataError`
    naming the accepted kinds for anything else."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected {CT_INPUTS}")
    if path.is_dir():
        manifest = path / "manifest.csv"
        if manifest.is_file():
            header = _csv_header(manifest)
            if "hr" in header and "id" in header:  # a CT cache
                rows = read_csv_rows(manifest)[1]
                sources = [
                    CtSource(r["id"], f"{manifest} row {i}", cache=path) for i, r in enumerate(rows, 2)
                ]
                return [s for s in sources if check_id(s.id, s.source, "id")]
            if "ct" not in header:
                raise DataError(f"{manifest}: neither a CT cache's nor a CT manifest; expected {CT_INPUTS}")
            path = manifest  # a phantoms folder: its manifest is the generic one
        elif not is_ctrate_dir(path):
            raise DataError(f"{path}: no manifest.csv or CT-RATE reports CSV in it; expected {CT_INPUTS}")
    return [CtSource(s.id, s.source, subject=s) for s in read_input(path, check=False)]


def load_ct(source: CtSource, max_voxels: int = MAX_VOXELS) -> CtScan:
    """Load one CT source (HU, affine, report, truth path); raises `DataError` on bad input."""
    if source.cache is not None:
        meta = read_meta(source.cache, source.id)
        hr = source.cache / source.id / "hr.npy"
        try:
            ct = np.load(hr, mmap_mode="r")[0]
        except (OSError, ValueError, IndexError) as err:
            raise DataError(f"{hr}: cannot read cached CT ({err})") from err
        hu = decode_ct(np.asarray(ct, dtype=np.float32))
        if "affine" not in meta:
            raise DataError(f"{source.cache / source.id / 'meta.json'}: no 'affine'; prepare the CT again")
        recorded = meta.get("ct")
        affine = np.asarray(meta["affine"], dtype=np.float64)
        findings, impression, ct = meta.get("findings", ""), meta.get("impression", ""), str(recorded or hr)
        return CtScan(hu, affine, findings, impression, ct, _truth_beside(recorded))
    subject = source.subject
    subject.check()
    volume = open_volume(subject.ct, max_voxels)
    affine = volume.affine if subject.spacing is None else override_spacing(volume.affine, subject.spacing)
    hu = volume.read()
    if not np.isfinite(hu).all():
        raise DataError(f"{subject.ct}: CT has {int((~np.isfinite(hu)).sum())} NaN or infinite voxels")
    if subject.rescale is not None:
        hu = apply_rescale(hu, *subject.rescale)
    return CtScan(
        hu, affine, subject.findings, subject.impression, str(subject.ct), _truth_beside(subject.ct)
    )


def _truth_beside(ct: str | os.PathLike | None) -> Path | None:
    """The phantom truth.json in the folder of the CT file `ct`, when there is one."""
    truth = Path(ct).parent / "truth.json" if ct else None
    return truth if truth is not None and truth.is_file() else None


def truth_labels(path: Path) -> dict:
    """{"effusion", "cardiomegaly"} from a phantom's truth.json (`findings`: effusion severity or "none",
    effusion_side, cardiomegaly)."""
    try:
        findings = json.loads(path.read_text(encoding="utf-8"))["findings"]
        effusion = findings["effusion"]
        side = "none" if effusion in (None, "none") else findings["effusion_side"]
        return {"effusion": side, "cardiomegaly": bool(findings["cardiomegaly"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a phantom truth with findings.effusion / cardiomegaly ({err})") from err
