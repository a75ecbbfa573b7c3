"""Readers: manifest CSV, CT-RATE layout, DICOM series, errors naming file, row and column."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsyn.data import cache
from medsyn.data.nifti import save_nifti, spacing_affine
from medsyn.data.readers import is_ctrate_dir, load_volume, read_ctrate, read_input, read_manifest
from medsyn.errors import DataError

COLUMNS = ["id", "ct", "lobes", "airway", "vessels", "findings", "impression"]


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    vol = np.zeros((8, 8, 8), np.int16)
    (tmp_path / "a").mkdir()
    save_nifti(tmp_path / "a" / "ct.nii.gz", vol, spacing_affine(1.0, vol.shape))
    save_nifti(tmp_path / "a" / "lobes.nii.gz", vol.astype(np.uint8), spacing_affine(1.0, vol.shape))
    save_nifti(tmp_path / "b.nii.gz", vol, spacing_affine(1.0, vol.shape))
    rows = [
        {
            "id": "a",
            "ct": "a/ct.nii.gz",
            "lobes": "a/lobes.nii.gz",
            "findings": "Clear lungs.",
            "impression": "Normal.",
        },
        {"id": "b", "ct": "b.nii.gz", "findings": "", "impression": "Normal."},
    ]
    return write_csv(tmp_path / "manifest.csv", rows, COLUMNS)


def test_manifest_paths_are_relative_to_csv(manifest: Path):
    subjects = read_manifest(manifest)
    assert [s.id for s in subjects] == ["a", "b"]
    assert subjects[0].ct == manifest.parent / "a" / "ct.nii.gz"
    assert set(subjects[0].masks) == {"lobes"} and subjects[1].masks == {}
    assert subjects[0].findings == "Clear lungs." and subjects[1].impression == "Normal."


def test_manifest_missing_column_names_file(tmp_path: Path):
    path = write_csv(tmp_path / "m.csv", [{"id": "a", "ct": "x.nii.gz"}], ["id", "ct"])
    with pytest.raises(DataError, match=r"m\.csv.*missing column.*findings"):
        read_manifest(path)


def test_manifest_missing_file_names_row_and_column(manifest: Path):
    rows = list(csv.DictReader(open(manifest)))
    rows[1]["vessels"] = "nope.nii.gz"
    write_csv(manifest, rows, COLUMNS)
    with pytest.raises(DataError, match=r"manifest\.csv row 3, column 'vessels': no such file"):
        read_manifest(manifest)
    assert len(read_manifest(manifest, check=False)) == 2  # prepare checks per subject instead


def test_manifest_duplicate_id(manifest: Path):
    rows = list(csv.DictReader(open(manifest)))
    rows[1]["id"] = "a"
    write_csv(manifest, rows, COLUMNS)
    with pytest.raises(DataError, match="row 3, column 'id': duplicate"):
        read_manifest(manifest)


def test_missing_report_is_an_error(manifest: Path):
    rows = list(csv.DictReader(open(manifest)))
    rows[1]["impression"] = ""
    write_csv(manifest, rows, COLUMNS)
    with pytest.raises(DataError, match="row 3: missing report"):
        read_manifest(manifest)


def make_ctrate(root: Path) -> Path:
    vol_dir = root / "dataset" / "train" / "train_1" / "train_1_a"
    vol_dir.mkdir(parents=True)
    save_nifti(vol_dir / "train_1_a_1.nii.gz", np.zeros((6, 6, 4), np.int16), np.eye(4))
    write_csv(
        root / "train_reports.csv",
        [
            {
                "VolumeName": "train_1_a_1.nii.gz",
                "ClinicalInformation_EN": "",
                "Technique_EN": "",
                "Findings_EN": "No effusion.",
                "Impressions_EN": "Normal chest.",
            }
        ],
        ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
    )
    (root / "metadata").mkdir()
    write_csv(
        root / "metadata" / "train_metadata.csv",
        [
            {
                "VolumeName": "train_1_a_1.nii.gz",
                "RescaleSlope": "1.0",
                "RescaleIntercept": "-1024",
                "XYSpacing": "[0.75, 0.8]",
                "ZSpacing": "1.5",
            }
        ],
        ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
    )
    return root


def test_ctrate_layout(tmp_path: Path):
    root = make_ctrate(tmp_path)
    assert is_ctrate_dir(root) and not is_ctrate_dir(root / "metadata")
    (subject,) = read_input(root)
    assert subject.id == "train_1_a_1"
    assert subject.ct.name == "train_1_a_1.nii.gz" and subject.ct.is_file()
    assert subject.rescale == (1.0, -1024.0) and subject.spacing == (0.75, 0.8, 1.5)
    assert subject.findings == "No effusion." and subject.impression == "Normal chest."


def test_ctrate_missing_volume(tmp_path: Path):
    root = make_ctrate(tmp_path)
    next(root.rglob("*.nii.gz")).unlink()
    with pytest.raises(DataError, match=r"train_reports\.csv row 2.*VolumeName"):
        read_ctrate(root)


def test_not_an_input(tmp_path: Path):
    with pytest.raises(DataError, match="no such manifest"):
        read_input(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="no reports CSV"):
        read_input(tmp_path)


def write_dicom_series(
    folder: Path, volume: np.ndarray, iop, origin, spacing, slope=1.0, intercept=-1024.0, claim=None
):
    """Write `volume` (cols i, rows j, slices k) as an uncompressed CT series (LPS positions);
    `claim=(rows, columns)` makes the headers claim that size whatever pixel data they hold."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    series = generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing, column spacing
        ds.Rows, ds.Columns = claim or (volume.shape[1], volume.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        raw = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = raw.tobytes()
        # shuffled file names: the reader must order slices by position, not by name
        ds.save_as(folder / f"{(k * 7) % volume.shape[2]:03d}.dcm", enforce_file_format=True)


def test_dicom_series_affine_and_hu(tmp_path: Path):
    vol = np.full((6, 5, 4), -1000.0, np.float32)
    vol[4, 1, 2] = 500.0
    iop = [1, 0, 0, 0, 1, 0]  # axial: columns to patient left (+x LPS), rows to posterior (+y LPS)
    write_dicom_series(tmp_path / "series", vol, iop, origin=[-10.0, 20.0, 30.0], spacing=(0.7, 0.8, 2.5))
    (tmp_path / "series" / "notes.txt").write_text("not dicom")
    hu, affine = load_volume(tmp_path / "series")
    assert hu.shape == (6, 5, 4)
    np.testing.assert_allclose(hu, vol, atol=0.5)
    world_lps = np.array([-10.0 + 4 * 0.7, 20.0 + 1 * 0.8, 30.0 + 2 * 2.5])
    np.testing.assert_allclose((affine @ [4, 1, 2, 1])[:3], world_lps * [-1, -1, 1], atol=1e-6)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")


def test_dicom_folder_without_series(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM image slices"):
        load_volume(tmp_path / "empty")


def test_nibabel_test_data_dimensionality():
    from nibabel.testing import data_path

    array, affine = load_volume(Path(data_path) / "anatomical.nii")
    assert array.shape == (33, 41, 25) and nib.aff2axcodes(affine) == ("L", "A", "S")
    with pytest.raises(DataError, match="expected a 3-D volume"):
        load_volume(Path(data_path) / "example4d.nii.gz")


def hostile_nifti(path: Path, shape: tuple[int, ...], data: bytes = bytes(16)) -> Path:
    """A NIfTI file of a few hundred bytes whose header claims `shape` int16 voxels (gzipped for .gz)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    raw = header.binaryblock + bytes(4) + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def hostile_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """Files that claim gigabytes in a few hundred bytes each -> (path, expected reason)."""
    tiny = np.zeros((2, 2, 2), np.float32)
    write_dicom_series(
        root / "dcm_huge", tiny, [1, 0, 0, 0, 1, 0], [0, 0, 0], (1, 1, 1), claim=(40000, 40000)
    )
    write_dicom_series(
        root / "dcm_short", tiny, [1, 0, 0, 0, 1, 0], [0, 0, 0], (1, 1, 1), claim=(20000, 20000)
    )
    return {
        "frames": (hostile_nifti(root / "frames.nii.gz", (48, 48, 48, 30000)), "more than the limit"),
        "huge": (hostile_nifti(root / "huge.nii", (1200, 1200, 1200), bytes(128)), "more than the limit"),
        "short": (hostile_nifti(root / "short.nii", (1000, 1000, 1000)), "truncated"),
        "dcm_huge": (root / "dcm_huge", "more than the limit"),
        "dcm_short": (root / "dcm_short", "truncated"),
    }


def test_hostile_headers_are_refused_without_allocating(tmp_path: Path):
    """Each file is refused from its header; in a child process whose address space is capped 1 GiB
    above its size after imports (so a reader that did allocate fails fast), peak RSS grows < 64 MiB."""
    inputs = hostile_inputs(tmp_path)
    assert max((p.stat().st_size for p, _ in inputs.values() if p.is_file()), default=0) < 600
    child = textwrap.dedent(
        """
        import os, resource, sys
        from medsyn.data.readers import load_volume
        from medsyn.errors import DataError
        size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for path in sys.argv[1:]:
            try:
                load_volume(path)
                print("read", path)
            except (DataError, MemoryError) as err:
                print(type(err).__name__, str(err).replace(chr(10), " "))
        print("rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    paths = [str(p) for p, _ in inputs.values()]
    done = subprocess.run([sys.executable, "-c", child, *paths], capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == len(paths) + 1, done.stderr[-2000:]
    for line, (path, reason) in zip(lines, inputs.values(), strict=False):
        assert line.startswith(f"DataError {path}: ") and reason in line, line
    assert int(lines[-1].split()[1]) < 64 * 1024


def test_voxel_limit_and_truncation_named(tmp_path: Path):
    path = hostile_nifti(tmp_path / "short.nii", (64, 64, 64))
    with pytest.raises(
        DataError, match=r"short\.nii: header claims 64x64x64 voxels \(524,288 bytes\).*holds 16 bytes"
    ):
        load_volume(path)
    save_nifti(tmp_path / "ok.nii", np.zeros((4, 5, 6), np.int16), np.eye(4))
    assert load_volume(tmp_path / "ok.nii")[0].shape == (4, 5, 6)
    with pytest.raises(
        DataError, match=r"ok\.nii: header claims 4x5x6 = 120 voxels, more than the limit of 100"
    ):
        load_volume(tmp_path / "ok.nii", max_voxels=100)


def test_unsafe_ids_are_refused_by_both_readers_and_the_cache(tmp_path: Path, manifest: Path):
    root = make_ctrate(tmp_path / "ctrate")
    for name in ("../x/evil.nii.gz", "..nii.gz", "a\\b.nii.gz", ".nii.gz"):
        reports = root / "train_reports.csv"
        reports.write_text(f"VolumeName,Findings_EN,Impressions_EN\n{name},Clear.,Normal.\n")
        with pytest.raises(DataError, match=r"train_reports\.csv row 2, column 'VolumeName': id "):
            read_ctrate(root, check=False)
    rows = list(csv.DictReader(open(manifest)))
    for bad in ("../b", "..", ".hidden", "a/b", "tab\there", "x" * 201):
        rows[1]["id"] = bad
        write_csv(manifest, rows, COLUMNS)
        with pytest.raises(DataError, match=r"manifest\.csv row 3, column 'id': id "):
            read_manifest(manifest, check=False)
    hr = np.zeros((4, 4, 4, 4), np.float32)
    with pytest.raises(DataError, match="subject id '../evil' contains a path separator"):
        cache.write_subject(tmp_path / "cache", "../evil", hr, hr, {"findings": "", "impression": ""})
    assert not (tmp_path / "evil").exists()


def test_non_utf8_row_is_a_row_error(tmp_path: Path, manifest: Path):
    head, tail = manifest.read_bytes().rsplit(b"Normal.", 1)  # row 3's impression
    manifest.write_bytes(head + "Épanchement.".encode("latin-1") + tail)
    good, bad = read_manifest(manifest, check=False)
    assert good.error == "" and "row 3, column 'impression': not valid UTF-8 text (byte 0xc9)" in bad.error
    with pytest.raises(DataError, match=r"row 3, column 'impression': not valid UTF-8"):
        read_manifest(manifest)
    root = make_ctrate(tmp_path / "ctrate")
    reports = root / "train_reports.csv"
    reports.write_bytes(reports.read_bytes().replace(b"No effusion.", b"Pas d'\xe9panchement."))
    (subject,) = read_ctrate(root, check=False)
    assert "row 2, column 'Findings_EN': not valid UTF-8 text (byte 0xe9)" in subject.error
