"""Real radiographs through `medsyn prepare --cxr`: CSV with PNG / DICOM, the MIMIC-CXR layout, failures."""

import json

import numpy as np
import pytest
from PIL import Image

from medsyn.cli import main
from medsyn.radiograph.cache import load_image, read_radiograph_manifest
from medsyn.radiograph.readers import read_radiograph, split_report

pytestmark = pytest.mark.usefixtures("one_thread")

RAMP = np.tile(np.arange(40), (30, 1))  # (30, 40): dark on the left, bright on the right


def _dicom(path, pixels, photometric="MONOCHROME2", view=None, window=None, rescale=(1.0, 0.0)):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    pixels = np.asarray(pixels, dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.ImagerPixelSpacing = [0.2, 0.2]
    if view:
        ds.ViewPosition = view
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_png_8_and_16_bit_and_monochrome1_dicom(tmp_path):
    Image.fromarray((RAMP * 6).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((RAMP * 100).astype(np.uint16)).save(tmp_path / "b.png")  # 0..3900 of 65535
    _dicom(tmp_path / "c.dcm", RAMP * 100, photometric="MONOCHROME1")
    eight, _ = read_radiograph(tmp_path / "a.png")
    np.testing.assert_allclose(eight[0, [0, 39]], [0.0, 234 / 255], atol=1e-6)  # as stored
    sixteen, _ = read_radiograph(tmp_path / "b.png")
    assert sixteen[0, 0] == 0.0 and sixteen[0, -1] == 1.0  # percentiles stretch 12 bits to the range
    inverted, spacing = read_radiograph(tmp_path / "c.dcm")
    assert spacing == 0.2
    assert inverted[0, 0] == pytest.approx(1.0) and inverted[0, -1] == pytest.approx(0.0)  # high value black
    assert np.all(np.diff(inverted[0]) <= 0)


def test_dicom_voi_window_after_rescale(tmp_path):
    # stored 100 * column, rescaled to 100 * column - 1000; the window 0..1000 spans columns 10..20
    _dicom(tmp_path / "w.dcm", RAMP * 100, window=(500, 1001), rescale=(1.0, -1000.0))
    image, _ = read_radiograph(tmp_path / "w.dcm")
    assert image[0, 9] == 0.0 and image[0, 21] == 1.0
    np.testing.assert_allclose(image[0, [10, 15, 20]], [0.0, 0.5, 1.0], atol=1e-3)


def _csv(tmp_path, text):
    (tmp_path / "cxr.csv").write_text(text)
    return str(tmp_path / "cxr.csv")


def test_csv_to_cache_with_labels_padding_and_a_missing_image(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    Image.fromarray((RAMP * 6).astype(np.uint8)).save(tmp_path / "img" / "a.png")  # 30 x 40: wide
    Image.fromarray((RAMP.T * 100).astype(np.uint16)).save(tmp_path / "img" / "b.png")
    _dicom(tmp_path / "img" / "c.dcm", RAMP * 100, photometric="MONOCHROME1")
    csv = _csv(tmp_path, "image,findings,impression,effusion,cardiomegaly\n"
                         "img/a.png,Small left pleural effusion.,Left effusion.,,\n"
                         "img/b.png,Normal heart size.,No acute findings.,right,true\n"
                         "img/c.dcm,,No effusion.,none,\n"
                         "img/missing.png,Clear lungs.,Normal.,,\n")  # fmt: skip
    out = tmp_path / "cache"
    assert main(["prepare", "--cxr", "--input", csv, "--out", str(out), "--size", "16", "--no-progress"]) == 0
    rows = {r["id"]: r for r in read_radiograph_manifest(out)}
    assert set(rows) == {"img_a", "img_b", "img_c"}
    assert (rows["img_a"]["effusion"], rows["img_a"]["cardiomegaly"]) == ("left", False)  # from the report
    assert (rows["img_b"]["effusion"], rows["img_b"]["cardiomegaly"]) == ("right", True)  # given
    assert rows["img_c"]["kind"] == "radiograph" and rows["img_c"]["spacing_mm"] == str(0.2 * 40 / 16)
    a = load_image(rows["img_a"])[0]
    assert a.shape == (16, 16)
    assert np.all(a[0] == -1) and np.all(a[-1] == -1)  # 30 x 40 padded with black above and below
    assert a[8, -1] > a[8, 0]  # the ramp kept its direction
    c = load_image(rows["img_c"])[0]
    assert c[8, 0] > c[8, -1]  # MONOCHROME1 inverted
    failed = (out / "failed.csv").read_text()
    assert "img_missing" in failed and "no such image file" in failed
    assert json.loads((out / "img_b" / "meta.json").read_text())["labels_from"] == "input"


def test_bad_csv_is_a_one_line_error_naming_file_and_column(tmp_path, capsys):
    csv = _csv(tmp_path, "path,findings\nx.png,Normal.\n")
    assert main(["prepare", "--cxr", "--input", csv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cxr.csv" in err and "'image'" in err
    csv = _csv(tmp_path, "image,effusion\nx.png,left\n")
    assert main(["prepare", "--cxr", "--input", csv, "--out", str(tmp_path / "o")]) == 2
    assert "'findings'" in capsys.readouterr().err


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  Cough.

 FINDINGS:

 The heart is enlarged.  Moderate right pleural effusion.
 No pneumothorax.

 IMPRESSION:

 Cardiomegaly and right effusion.
"""


def test_mimic_layout_pairs_reports_with_frontal_images(tmp_path):
    reports, images = (
        tmp_path / "mimic-cxr-reports" / "files" / "p10",
        tmp_path / "mimic-cxr" / "files" / "p10",
    )
    (reports / "p10000032").mkdir(parents=True)
    (reports / "p10000032" / "s50414267.txt").write_text(MIMIC_REPORT)
    (reports / "p10000032" / "s50000001.txt").write_text(
        " FINDINGS: Lungs are clear.\n IMPRESSION: Normal.\n"
    )
    study = images / "p10000032" / "s50414267"
    _dicom(study / "a_lateral.dcm", np.full((30, 40), 7), view="LL")  # first by name, but lateral
    _dicom(study / "b_frontal.dcm", RAMP * 100, view="PA")
    second = images / "p10000032" / "s50000001"
    second.mkdir(parents=True)
    Image.fromarray(np.full((30, 40), 9, np.uint8)).save(second / "aaa.jpg")
    Image.fromarray((RAMP * 6).astype(np.uint8)).save(second / "bbb.jpg")
    (tmp_path / "metadata.csv").write_text("dicom_id,ViewPosition\naaa,LATERAL\nbbb,PA\n")
    out = tmp_path / "cache"
    assert main(["prepare", "--cxr", "--input", str(tmp_path), "--out", str(out), "--size", "16",
                 "--no-progress"]) == 0  # fmt: skip
    rows = {r["id"]: r for r in read_radiograph_manifest(out)}
    assert set(rows) == {"p10000032_s50414267", "p10000032_s50000001"}
    first = rows["p10000032_s50414267"]
    assert first["findings"] == "The heart is enlarged. Moderate right pleural effusion. No pneumothorax."
    assert first["impression"] == "Cardiomegaly and right effusion."
    assert (first["effusion"], first["cardiomegaly"]) == ("right", True)
    meta = json.loads((out / "p10000032_s50414267" / "meta.json").read_text())
    assert meta["image_file"].endswith("b_frontal.dcm")  # the PA image, not the constant lateral
    assert rows["p10000032_s50000001"]["impression"] == "Normal."
    meta = json.loads((out / "p10000032_s50000001" / "meta.json").read_text())
    assert meta["image_file"].endswith("bbb.jpg")  # PA by the metadata CSV


def test_split_report_without_headings_is_all_findings():
    assert split_report("Heart normal.\nLungs clear.") == ("Heart normal. Lungs clear.", "")
    assert split_report("IMPRESSION: No change.") == ("", "No change.")
