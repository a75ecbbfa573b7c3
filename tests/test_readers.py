"""Readers: manifest CSV, CT-RATE layout, DICOM series, errors naming file, row and column."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

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


def write_dicom_series(folder: Path, volume: np.ndarray, iop, origin, spacing, slope=1.0, intercept=-1024.0):
    """Write `volume` (cols i, rows j, slices k) as an uncompressed CT series (LPS positions)."""
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
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
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
