"""DRR projection physics and orientation, and `medsyn drr` on CT caches and phantom folders."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medsyn.cli import main
from medsyn.data import cache
from medsyn.data.channels import encode_ct
from medsyn.data.phantom import write_dataset
from medsyn.radiograph.cache import load_image, read_radiograph_manifest
from medsyn.radiograph.drr import (
    MU_WATER,
    WINDOW_WET_MM,
    attenuation,
    display_window,
    drr,
    line_integrals,
    resize_square,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _air(shape=(10, 12, 14)):
    return np.full(shape, -1024.0, dtype=np.float32)


def test_water_slab_integral_is_mu_times_thickness():
    hu = _air()
    hu[2:6, 3:8, 4:9] = 0.0  # water, 5 voxels along the antero-posterior axis
    spacing = (1.5, 2.0, 2.5)
    p, pixel_mm = line_integrals(hu, np.diag([*spacing, 1.0]))
    assert p.shape == (14, 10)  # (superior-inferior, right-left)
    assert pixel_mm == (2.5, 1.5)
    assert p.max() == pytest.approx(MU_WATER * 5 * 2.0, rel=1e-5)
    assert np.count_nonzero(p) == 4 * 5  # the slab's footprint, and air outside it gives exactly 0


def test_air_gives_zero_and_bone_more_than_water():
    assert np.all(line_integrals(_air(), np.eye(4))[0] == 0)
    assert attenuation(np.array([-1024.0, 0.0, 1000.0])).tolist() == pytest.approx(
        [0.0, MU_WATER, 2 * MU_WATER]
    )


def test_patient_right_on_image_left_and_head_at_top():
    hu = _air()
    hu[8, :, 1] = 0.0  # RAS: high x = patient's right, low z = feet
    hu[1, :, 12] = 1000.0  # patient's left, near the head
    p, _ = line_integrals(hu, np.eye(4))
    right_foot = np.unravel_index(np.argmax(np.where(p < 0.3, p, 0)), p.shape)
    left_head = np.unravel_index(np.argmax(p), p.shape)
    assert right_foot == (14 - 1 - 1, 10 - 1 - 8)  # bottom rows, left columns
    assert left_head == (14 - 1 - 12, 10 - 1 - 1)  # top rows, right columns


def test_same_body_stored_in_lps_order_gives_the_same_film():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 500, (6, 7, 8)).astype(np.float32)
    ras = np.diag([1.0, 2.0, 3.0, 1.0])
    lps = np.diag([-1.0, -2.0, 3.0, 1.0])  # i towards the left, j towards posterior
    lps[:3, 3] = [5.0, 12.0, 0.0]
    flipped = hu[::-1, ::-1, :]
    p_ras, mm_ras = line_integrals(hu, ras)
    p_lps, mm_lps = line_integrals(flipped, lps)
    np.testing.assert_allclose(p_lps, p_ras, rtol=1e-6)
    assert mm_ras == mm_lps


def test_resize_square_keeps_the_aspect_and_pads_with_air():
    p = np.full((20, 10), 2.0, dtype=np.float32)  # 20 x 10 pixels of 1 x 1 mm: twice as tall as wide
    out, spacing = resize_square(p, (1.0, 1.0), 8)
    assert out.shape == (8, 8) and spacing == pytest.approx(20 / 8)
    np.testing.assert_allclose(out[:, 2:6], 2.0, rtol=1e-5)  # a uniform field stays uniform
    assert np.all(out[:, :2] == 0) and np.all(out[:, 6:] == 0)


def test_display_window_is_fixed_and_monotone():
    low, high = (MU_WATER * w for w in WINDOW_WET_MM)
    values = display_window(np.array([0.0, low, (low + high) / 2, high, 10.0]))
    np.testing.assert_allclose(values, [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_drr_range_shape_and_spacing():
    hu = _air((16, 16, 16))
    hu[4:12, :, 4:12] = 40.0  # 16 voxels of 12 mm: 192 mm of soft tissue, inside the window
    image, spacing = drr(hu, np.diag([2.0, 12.0, 2.0, 1.0]), 8)
    assert image.shape == (8, 8) and spacing == pytest.approx(4.0)
    assert image.min() == -1.0 and image.max() > -1.0  # outside the body black, the body brighter


# --- the command -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("phantoms"), 2, size=32, progress=False)


def _ct_cache(root, phantoms=None):
    """A CT cache of 2 subjects at 16^3: one a phantom (its meta names the phantom's ct), one not."""
    rng = np.random.default_rng(1)
    affine = np.diag([4.0, 4.0, 4.0, 1.0]).tolist()
    for i, sid in enumerate(["phantom_0000", "case_b"]):
        hu = rng.uniform(-1000, 200, (16, 16, 16)).astype(np.float32)
        hr = np.stack([encode_ct(hu), *np.zeros((3, 16, 16, 16), np.float32)])
        report = ("Large right pleural effusion. The heart is enlarged.", "Right effusion. Cardiomegaly.")
        meta = {"findings": report[0], "impression": report[1], "affine": affine, "size": 16}
        if i == 0 and phantoms is not None:
            meta["ct"] = str(phantoms / sid / "ct.nii.gz")
        cache.write_subject(root, sid, hr, hr[:, ::4, ::4, ::4], meta)
    cache.write_manifest(root)
    return root


def test_drr_of_a_ct_cache_labels_from_truth_or_report(tmp_path, phantoms, capsys):
    src = _ct_cache(tmp_path / "cache", phantoms)
    assert (
        main(["drr", "--input", str(src), "--out", str(tmp_path / "drr"), "--size", "16", "--no-progress"])
        == 0
    )
    rows = {r["id"]: r for r in read_radiograph_manifest(tmp_path / "drr")}
    assert set(rows) == {"phantom_0000", "case_b"}
    truth = json.loads((phantoms / "phantom_0000" / "truth.json").read_text())["findings"]
    expected = "none" if truth["effusion"] == "none" else truth["effusion_side"]
    assert rows["phantom_0000"]["effusion"] == expected
    assert rows["phantom_0000"]["cardiomegaly"] == truth["cardiomegaly"]
    assert (rows["case_b"]["effusion"], rows["case_b"]["cardiomegaly"]) == ("right", True)  # from the report
    meta = json.loads((tmp_path / "drr" / "case_b" / "meta.json").read_text())
    assert meta["labels_from"] == "report" and meta["kind"] == "drr" and meta["spacing_mm"] == 4.0
    image = load_image(rows["case_b"])
    assert image.shape == (1, 16, 16) and -1 <= image.min() and image.max() <= 1
    assert rows["case_b"]["findings"].startswith("Large right pleural effusion")


def test_drr_of_a_phantoms_folder_resumes_and_reports_a_corrupt_subject(tmp_path, phantoms, capsys):
    out = tmp_path / "drr"
    args = ["drr", "--input", str(phantoms), "--out", str(out), "--size", "16", "--no-progress"]
    assert main(args) == 0
    rows = read_radiograph_manifest(out)
    assert len(rows) == 2
    for row in rows:
        truth = json.loads((phantoms / row["id"] / "truth.json").read_text())["findings"]
        assert row["cardiomegaly"] == truth["cardiomegaly"]
        assert json.loads((out / row["id"] / "meta.json").read_text())["labels_from"] == "truth"
    before = os.stat(out / "phantom_0000" / "image.npy").st_mtime_ns
    assert main(args) == 0
    assert "projected 0, already done 2" in capsys.readouterr().out
    assert os.stat(out / "phantom_0000" / "image.npy").st_mtime_ns == before  # not redone

    broken = tmp_path / "broken"
    write_dataset(broken, 2, size=32, progress=False)
    (broken / "phantom_0001" / "ct.nii.gz").write_bytes(b"not a nifti")
    code = main(
        ["drr", "--input", str(broken), "--out", str(tmp_path / "drr2"), "--size", "16", "--no-progress"]
    )
    assert code == 0
    failed = (tmp_path / "drr2" / "failed.csv").read_text()
    assert "phantom_0001" in failed and "cannot read as NIfTI" in failed
    assert [r["id"] for r in read_radiograph_manifest(tmp_path / "drr2")] == ["phantom_0000"]


def test_drr_of_a_nifti_manifest_with_anisotropic_spacing(tmp_path):
    hu = np.full((20, 10, 8), -1024, dtype=np.int16)
    hu[5:15, 2:8, 2:6] = 0
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 2.0, 5.0, 1.0])), str(tmp_path / "a.nii.gz"))
    (tmp_path / "m.csv").write_text(
        "id,ct,lobes,airway,vessels,findings,impression\na,a.nii.gz,,,,No effusion.,Normal.\n"
    )
    assert main(["drr", "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "drr"), "--size", "20",
                 "--no-progress"]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "drr" / "a" / "meta.json").read_text())
    assert meta["spacing_mm"] == pytest.approx(40 / 20)  # the 40 mm superior-inferior extent fills the image
    image = np.load(tmp_path / "drr" / "a" / "image.npy")[0]
    assert (image[:, :5] == -1).all() and (image[:, 15:] == -1).all()  # 20 mm wide: centred, air beside


def test_bad_input_and_size_mismatch_are_one_line_errors(tmp_path, phantoms, capsys):
    assert main(["drr", "--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "expected a CT cache" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "drr"
    assert main(["drr", "--input", str(phantoms), "--out", str(out), "--size", "16", "--no-progress"]) == 0
    assert main(["drr", "--input", str(phantoms), "--out", str(out), "--size", "8", "--no-progress"]) == 2
    assert "holds radiographs of size 16" in capsys.readouterr().err
    assert main(["drr", "--input", str(phantoms), "--out", str(out), "--size", "8", "--overwrite",
                 "--no-progress"]) == 0  # fmt: skip
    assert {r["size"] for r in read_radiograph_manifest(out)} == {"8"}
