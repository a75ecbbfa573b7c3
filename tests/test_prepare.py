"""`medsyn prepare`: cache layout, given masks, resuming, CT-RATE rescale, every bad-input kind, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_segment import tiny_chest

from medsyn.cli import main
from medsyn.data import cache
from medsyn.data.channels import ENCODING, decode_volume, downsample, encode_lobes
from medsyn.data.nifti import save_nifti
from medsyn.data.prepare import PrepareOptions, parse_fractions, prepare
from medsyn.data.preprocess import PreprocessConfig
from medsyn.errors import ConfigError, DataError

COLUMNS = ["id", "ct", "lobes", "airway", "vessels", "findings", "impression"]
FLIPPED = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS, like many scanners' NIfTI exports
# the tiny test chests span 32 mm, less than the default minimum field of view of a chest CT
OPTIONS = dict(preprocess=PreprocessConfig(size=32, spacing_mm=1.0), progress=False, min_extent_mm=16.0)


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def add_subject(root: Path, sid: str, hu: np.ndarray, affine=FLIPPED, **masks) -> dict:
    (root / sid).mkdir(parents=True, exist_ok=True)
    save_nifti(root / sid / "ct.nii.gz", hu, affine, dtype=np.float32)
    row = {"id": sid, "ct": f"{sid}/ct.nii.gz", "findings": f"Findings of {sid}.", "impression": "Normal."}
    for name, mask in masks.items():
        save_nifti(root / sid / f"{name}.nii.gz", mask, affine, dtype=np.uint8)
        row[name] = f"{sid}/{name}.nii.gz"
    return row


@pytest.fixture(scope="module")
def chest() -> dict[str, np.ndarray]:
    return tiny_chest(32)


def test_cache_layout_and_given_masks(tmp_path: Path, chest):
    given_lobes = (chest["left"] * 1 + chest["right"] * 4).astype(np.uint8)
    rows = [
        add_subject(tmp_path / "in", "a", chest["hu"], lobes=given_lobes),
        add_subject(tmp_path / "in", "b", chest["hu"]),
    ]
    manifest = write_rows(tmp_path / "in" / "manifest.csv", rows)
    result = prepare(manifest, tmp_path / "cache", PrepareOptions(**OPTIONS))
    assert result.done == ["a", "b"] and not result.failed
    hr = cache.load_array(tmp_path / "cache" / "a" / "hr.npy")
    lr = cache.load_array(tmp_path / "cache" / "a" / "lr.npy")
    assert isinstance(hr, np.memmap) and hr.dtype == np.float16 and hr.shape == (4, 32, 32, 32)
    assert lr.shape == (4, 8, 8, 8)
    np.testing.assert_allclose(lr, downsample(np.asarray(hr, np.float32), 4), atol=1e-3)  # block means
    meta = cache.read_meta(tmp_path / "cache", "a")
    assert meta["encoding"] == ENCODING
    # the given lobes come back as they are, flipped from LAS to RAS
    np.testing.assert_array_equal(decode_volume(np.asarray(hr, np.float32))["lobes"], given_lobes[::-1])
    np.testing.assert_allclose(hr[1], encode_lobes(given_lobes[::-1].astype(np.float32)), atol=1e-3)
    assert meta["masks"] == {"lobes": "input", "airway": "threshold", "vessels": "threshold"}
    assert nib.aff2axcodes(np.array(meta["affine"])) == ("R", "A", "S")
    np.testing.assert_allclose(np.array(meta["lr_affine"])[:3, :3], 4 * np.eye(3))
    assert (tmp_path / "cache" / "b" / "report.txt").read_text().startswith("Findings: Findings of b.")
    rows = cache.read_cache_manifest(tmp_path / "cache")
    assert [r["id"] for r in rows] == ["a", "b"] and {r["split"] for r in rows} <= {"train", "val", "test"}
    assert rows[1]["findings"] == "Findings of b." and Path(rows[1]["lr"]).is_file()


def test_resume_skips_finished_subjects(tmp_path: Path, chest):
    rows = [add_subject(tmp_path / "in", sid, chest["hu"]) for sid in ("a", "b", "c")]
    manifest = write_rows(tmp_path / "in" / "manifest.csv", rows)
    out = tmp_path / "cache"
    first = prepare(manifest, out, PrepareOptions(limit=2, **OPTIONS))
    assert first.done == ["a", "b"]
    mtime = (out / "a" / "hr.npy").stat().st_mtime_ns
    (out / ".c.half-written.tmp").mkdir()  # an interrupted write never counts as finished
    second = prepare(manifest, out, PrepareOptions(**OPTIONS))
    assert second.skipped == ["a", "b"] and second.done == ["c"]
    assert (out / "a" / "hr.npy").stat().st_mtime_ns == mtime
    assert [r["id"] for r in cache.read_cache_manifest(out)] == ["a", "b", "c"]


def test_every_bad_input_kind_is_listed(tmp_path: Path, chest):
    root = tmp_path / "in"
    rows = [add_subject(root, "good", chest["hu"])]
    rows.append(add_subject(root, "unreadable", chest["hu"]))
    (root / "unreadable" / "ct.nii.gz").write_bytes(b"this is not a NIfTI file")
    rows.append(add_subject(root, "truncated", chest["hu"]))
    data = (root / "truncated" / "ct.nii.gz").read_bytes()
    (root / "truncated" / "ct.nii.gz").write_bytes(data[: len(data) // 2])
    rows.append(add_subject(root, "fourd", np.zeros((8, 8, 8, 2), np.float32)))
    nan = chest["hu"].copy()
    nan[3, 4, 5] = np.nan
    rows.append(add_subject(root, "nan", nan))
    rows.append(add_subject(root, "shape", chest["hu"], airway=np.zeros((8, 8, 8), np.uint8)))
    rows.append({**add_subject(root, "noreport", chest["hu"]), "findings": "", "impression": ""})
    rows.append({**add_subject(root, "nofile", chest["hu"]), "vessels": "nofile/missing.nii.gz"})
    manifest = write_rows(root / "manifest.csv", rows)
    result = prepare(manifest, tmp_path / "cache", PrepareOptions(**OPTIONS))
    assert result.done == ["good"]
    with open(tmp_path / "cache" / "failed.csv") as f:
        reasons = {r["id"]: r["reason"] for r in csv.DictReader(f)}
    assert set(reasons) == {"unreadable", "truncated", "fourd", "nan", "shape", "noreport", "nofile"}
    assert "cannot read as NIfTI" in reasons["unreadable"]
    assert "cannot read as NIfTI" in reasons["truncated"]
    assert "expected a 3-D volume" in reasons["fourd"]
    assert "NaN" in reasons["nan"]
    assert "mask shape mismatch" in reasons["shape"] and "airway" in reasons["shape"]
    assert "missing report" in reasons["noreport"] and "row 8" in reasons["noreport"]
    assert "column 'vessels'" in reasons["nofile"] and "row 9" in reasons["nofile"]
    assert [r["id"] for r in cache.read_cache_manifest(tmp_path / "cache")] == ["good"]


def test_ctrate_rescale_and_spacing(tmp_path: Path, chest):
    root = tmp_path / "ctrate"
    (root / "vols").mkdir(parents=True)
    stored = np.rint(chest["hu"] + 1024).astype(np.int16)  # raw stored values, intercept -1024
    save_nifti(root / "vols" / "valid_1_a_1.nii.gz", stored, np.diag([2.0, 2.0, 2.0, 1.0]))
    (root / "valid_reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\nvalid_1_a_1.nii.gz,Clear.,Normal.\n"
    )
    (root / "valid_metadata.csv").write_text(
        'VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\nvalid_1_a_1.nii.gz,1,-1024,"[1.0, 1.0]",1.0\n'
    )
    prepare(root, tmp_path / "cache", PrepareOptions(**OPTIONS))
    meta = cache.read_meta(tmp_path / "cache", "valid_1_a_1")
    assert meta["impression"] == "Normal." and meta["spacing_mm"] == 1.0
    ct = decode_volume(
        np.asarray(cache.load_array(tmp_path / "cache" / "valid_1_a_1" / "hr.npy"), np.float32)
    )["ct"]
    # metadata spacing 1 mm (not the header's 2 mm): the 32^3 volume fills the 32^3 grid
    np.testing.assert_allclose(ct, np.clip(np.rint(chest["hu"]), -1024, 600), atol=3)


def test_cli_exit_codes(tmp_path: Path, chest, capsys):
    rows = [add_subject(tmp_path / "in", "a", chest["hu"])]
    manifest = write_rows(tmp_path / "in" / "manifest.csv", rows)
    args = ["prepare", "--input", str(manifest), "--size", "32", "--no-progress", "--min-extent-mm", "16"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    assert "prepared 1" in capsys.readouterr().out
    (tmp_path / "in" / "a" / "ct.nii.gz").write_bytes(b"junk")
    assert main([*args, "--out", str(tmp_path / "bad")]) == 1  # every subject failed
    (tmp_path / "in" / "manifest.csv").write_text("id,ct\na,a/ct.nii.gz\n")
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "missing column" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--size", "30"]) == 2  # not divisible by 4


def test_parallel_workers(tmp_path: Path, chest):
    rows = [add_subject(tmp_path / "in", sid, chest["hu"]) for sid in ("a", "b", "c")]
    rows[2]["ct"] = "c/missing.nii.gz"
    manifest = write_rows(tmp_path / "in" / "manifest.csv", rows)
    result = prepare(manifest, tmp_path / "cache", PrepareOptions(workers=2, **OPTIONS))
    assert result.done == ["a", "b"] and [f["id"] for f in result.failed] == ["c"]
    a = np.load(tmp_path / "cache" / "a" / "hr.npy")
    np.testing.assert_array_equal(a, np.load(tmp_path / "cache" / "b" / "hr.npy"))


def test_splits_and_options():
    splits = [cache.split_for(f"s{i}") for i in range(2000)]
    assert cache.split_for("s1") == splits[1]  # deterministic
    assert 0.75 < splits.count("train") / 2000 < 0.85 and splits.count("val") > 100
    assert {cache.split_for(f"s{i}", (0, 1, 0)) for i in range(50)} == {"val"}
    assert parse_fractions("0.7,0.2,0.1") == (0.7, 0.2, 0.1)
    with pytest.raises(ConfigError, match="three numbers"):
        parse_fractions("0.5,0.5")
    with pytest.raises(ConfigError, match="workers"):
        PrepareOptions(workers=0)
    with pytest.raises(DataError, match="no cache manifest"):
        cache.read_cache_manifest("/nonexistent")


def test_dicom_series_row_and_missing_backend_package(tmp_path: Path, chest, capsys):
    from test_readers import write_dicom_series

    root = tmp_path / "in"
    # axial series: DICOM columns run to the patient's left, rows posterior (LPS), slices superior
    write_dicom_series(
        root / "d" / "series", chest["hu"][::-1, ::-1], [1, 0, 0, 0, 1, 0], [0, 0, 0], (1, 1, 1)
    )
    row = {"id": "d", "ct": "d/series", "findings": "Clear.", "impression": "Normal."}
    manifest = write_rows(root / "manifest.csv", [row])
    result = prepare(manifest, tmp_path / "cache", PrepareOptions(**OPTIONS))
    assert result.done == ["d"]
    ct = decode_volume(np.asarray(cache.load_array(tmp_path / "cache" / "d" / "hr.npy"), np.float32))["ct"]
    np.testing.assert_allclose(ct, np.clip(np.rint(chest["hu"]), -1024, 600), atol=3)  # back in RAS
    code = main(["prepare", "--input", str(manifest), "--out", str(tmp_path / "c2"), "--backend", "lungmask"])
    if code == 2:  # lungmask not installed: one line naming the install command
        assert "pip install medsyn[seg]" in capsys.readouterr().err


def test_phantom_folder_prepares(tmp_path: Path):
    phantom = pytest.importorskip("medsyn.data.phantom")
    if not hasattr(phantom, "write_dataset"):
        pytest.skip("phantom generator not available")
    phantom.write_dataset(tmp_path / "ph", n=2, size=32, spacing_mm=8.0, seed=0, progress=False)
    options = PrepareOptions(preprocess=PreprocessConfig(size=32, spacing_mm=8.0), progress=False)
    result = prepare(tmp_path / "ph" / "manifest.csv", tmp_path / "cache", options)
    assert len(result.done) == 2 and not result.failed
    meta = cache.read_meta(tmp_path / "cache", result.done[0])
    assert set(meta["masks"].values()) == {"input"}  # the phantom gives all masks


# a tiny chest at 4 mm spans 128 mm, a plausible chest field of view; runs on the default options too
WIDE = np.diag([4.0, 4.0, 4.0, 1.0])
WIDE_OPTIONS = dict(preprocess=PreprocessConfig(size=32, spacing_mm=4.0), progress=False)


def test_hostile_volumes_are_listed_unread(tmp_path: Path, chest, monkeypatch):
    """Headers claiming gigabytes, truncated files, a 1-voxel volume and a hostile mask all land in
    failed.csv, refused from their headers: no voxel data is read at all (the reads are mocked)."""
    from nibabel.arrayproxy import ArrayProxy
    from pydicom.dataset import Dataset
    from test_readers import hostile_inputs, hostile_nifti

    reads = []

    def no_read(self, *args, **kwargs):
        reads.append(getattr(self, "file_like", "dicom"))
        raise AssertionError("voxel data was read")

    monkeypatch.setattr(ArrayProxy, "__array__", no_read)
    monkeypatch.setattr(Dataset, "pixel_array", property(no_read))
    root = tmp_path / "in"
    rows = [
        {"id": sid, "ct": str(path.relative_to(root)), "findings": "Clear.", "impression": "Normal."}
        for sid, (path, _) in hostile_inputs(root).items()
    ]
    rows.append(add_subject(root, "onevoxel", np.zeros((1, 1, 1), np.float32), np.eye(4)))
    rows.append(add_subject(root, "slab", chest["hu"], np.eye(4)))  # 32 mm: a slab, not a chest
    rows.append(add_subject(root, "badmask", chest["hu"], WIDE))
    hostile_nifti(root / "badmask" / "airway.nii", (1200, 1200, 1200))
    rows[-1]["airway"] = "badmask/airway.nii"
    result = prepare(
        write_rows(root / "manifest.csv", rows), tmp_path / "cache", PrepareOptions(**WIDE_OPTIONS)
    )
    with open(tmp_path / "cache" / "failed.csv") as f:
        reasons = {r["id"]: r["reason"] for r in csv.DictReader(f)}
    assert not result.done and len(reasons) == len(rows) and reads == []
    for sid in ("frames", "huge", "dcm_huge"):
        assert "more than the limit of 1,073,741,824 (--max-voxels)" in reasons[sid], reasons[sid]
    assert "truncated" in reasons["short"] and "truncated" in reasons["dcm_short"]
    assert "field of view 1 x 1 x 1 mm" in reasons["onevoxel"] and "100 mm" in reasons["onevoxel"]
    assert "field of view 32 x 32 x 32 mm" in reasons["slab"] and "--min-extent-mm" in reasons["slab"]
    assert "airway.nii: header claims 1200x1200x1200" in reasons["badmask"]


def test_limit_options_on_the_command_line(tmp_path: Path, chest, capsys):
    rows = [add_subject(tmp_path / "in", "a", chest["hu"], WIDE)]
    manifest = write_rows(tmp_path / "in" / "manifest.csv", rows)
    args = ["prepare", "--input", str(manifest), "--size", "32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "c1"), "--max-voxels", "1000"]) == 1
    assert "32x32x32 = 32,768 voxels, more than the limit of 1,000" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c2"), "--min-extent-mm", "200"]) == 1
    assert "smaller than the minimum 200 mm per axis" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="max_voxels=0"):
        PrepareOptions(max_voxels=0)
    with pytest.raises(ConfigError, match="min_extent_mm=-1"):
        PrepareOptions(min_extent_mm=-1)


def test_non_utf8_report_fails_only_its_row(tmp_path: Path, chest):
    root = tmp_path / "in"
    rows = [add_subject(root, "good", chest["hu"], WIDE), add_subject(root, "latin1", chest["hu"], WIDE)]
    manifest = write_rows(root / "manifest.csv", rows)
    manifest.write_bytes(manifest.read_bytes().replace(b"Findings of latin1.", b"Pas d'\xe9panchement."))
    result = prepare(manifest, tmp_path / "cache", PrepareOptions(**WIDE_OPTIONS))
    assert result.done == ["good"] and [f["id"] for f in result.failed] == ["latin1"]
    with open(tmp_path / "cache" / "failed.csv", encoding="utf-8") as f:
        (failure,) = csv.DictReader(f)
    assert "manifest.csv row 3, column 'findings': not valid UTF-8 text (byte 0xe9)" in failure["reason"]


def test_ctrate_id_cannot_leave_the_cache(tmp_path: Path, chest):
    root = tmp_path / "ctrate"
    (root / "vols").mkdir(parents=True)
    save_nifti(tmp_path / "x" / "evil.nii.gz", chest["hu"], WIDE)  # what ../x/evil.nii.gz points at
    save_nifti(root / "vols" / "valid_1.nii.gz", chest["hu"], WIDE)
    (root / "reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\n"
        "valid_1.nii.gz,Clear.,Normal.\n../x/evil.nii.gz,Clear.,Normal.\n"
    )
    with pytest.raises(
        DataError, match=r"reports\.csv row 3, column 'VolumeName': id '\.\./x/evil' contains a"
    ):
        prepare(root, tmp_path / "cache", PrepareOptions(**WIDE_OPTIONS))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["evil.nii.gz"]
