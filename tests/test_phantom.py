"""The built-in phantom dataset: anatomy, pathology, truth, determinism and the `medsyn phantom` CLI."""

import csv

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medsyn.cli import main
from medsyn.data.phantom import Lesion, PathologyParams, generate_phantom, sample_pathology

SIZE = 48


@pytest.fixture(scope="module")
def normal():
    return generate_phantom(SIZE, seed=7, params=PathologyParams())


def test_deterministic_by_seed_and_different_across_seeds():
    a, b = generate_phantom(32, seed=3), generate_phantom(32, seed=3)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.lobes, b.lobes)
    assert a.report == b.report and a.truth == b.truth
    assert not np.array_equal(a.ct, generate_phantom(32, seed=4).ct)


def test_volumes_labels_and_affine(normal):
    assert normal.ct.shape == (SIZE,) * 3 and normal.ct.dtype == np.int16
    assert set(np.unique(normal.lobes)) == {0, 1, 2, 3, 4, 5}
    assert set(np.unique(normal.airway)) <= {0, 1} and set(np.unique(normal.vessels)) <= {0, 1}
    assert np.allclose(np.diag(normal.affine)[:3], 256.0 / SIZE)
    lungs = normal.lobes > 0
    assert np.median(normal.ct[lungs & (normal.vessels == 0) & (normal.airway == 0)]) < -700
    assert normal.ct.min() >= -1024 and np.median(normal.ct[~lungs]) > -1000  # body is not all air


def test_left_lobes_are_on_the_patients_left(normal):
    # RAS+: +x is the patient's right, so the left lobes (1, 2) lie at low i
    i = np.arange(SIZE)[:, None, None]
    for label in (1, 2):
        assert (i * (normal.lobes == label)).sum() / (normal.lobes == label).sum() < SIZE / 2
    for label in (3, 4, 5):
        assert (i * (normal.lobes == label)).sum() / (normal.lobes == label).sum() > SIZE / 2
    k = np.arange(SIZE)[None, None, :]
    mean_k = {
        label: (k * (normal.lobes == label)).sum() / (normal.lobes == label).sum() for label in (1, 2, 3, 5)
    }
    assert mean_k[1] > mean_k[2] and mean_k[3] > mean_k[5]  # upper lobes above lower lobes


def test_airway_is_one_tree_from_the_top():
    ph = generate_phantom(64, seed=1, params=PathologyParams())
    labels, count = ndimage.label(ph.airway)
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.max() / sizes.sum() > 0.95  # essentially one connected tree
    assert ph.airway[:, :, -1].any() or ph.airway[:, :, -3:].any()  # the trachea leaves the top
    assert (ph.vessels.astype(bool) <= (ph.lobes > 0)).all()  # vessels lie inside the lungs


def test_same_seed_same_body_whatever_the_pathology():
    a = generate_phantom(32, seed=5, params=PathologyParams())
    b = generate_phantom(32, seed=5, params=PathologyParams(lesions=[Lesion(3, 10.0)]))
    assert np.array_equal(a.airway, b.airway)


def test_effusion_volume_grows_with_severity():
    volumes = [
        generate_phantom(SIZE, seed=2, params=PathologyParams(effusion=s, effusion_side="left")).truth[
            "effusion_ml"
        ]
        for s in ("none", "small", "moderate", "large")
    ]
    assert volumes[0] == 0.0 and volumes[1] < volumes[2] < volumes[3]
    bilateral = generate_phantom(
        SIZE, seed=2, params=PathologyParams(effusion="moderate", effusion_side="bilateral")
    )
    assert bilateral.truth["effusion_ml_left"] > 0 and bilateral.truth["effusion_ml_right"] > 0
    assert ndimage.label(bilateral.airway, np.ones((3, 3, 3)))[1] == 1  # bronchi cut by fluid are dropped


def test_ctr_and_laa_follow_the_parameters():
    small = generate_phantom(SIZE, seed=2, params=PathologyParams(ctr=0.42)).truth
    big = generate_phantom(SIZE, seed=2, params=PathologyParams(ctr=0.68)).truth
    assert big["ctr"] > small["ctr"] + 0.15
    emph = generate_phantom(
        SIZE, seed=2, params=PathologyParams(emphysema_lobe=1, emphysema_fraction=0.3)
    ).truth
    assert emph["laa950_percent"] > small["laa950_percent"] + 3.0


def test_lesions_are_placed_in_their_lobe_and_reported():
    params = PathologyParams(lesions=[Lesion(4, 34.0), Lesion(2, 8.0)])
    ph = generate_phantom(64, seed=9, params=params)
    kinds = sorted(x["kind"] for x in ph.truth["lesions"])
    assert kinds == ["mass", "nodule"]
    text = ph.report.findings.lower()
    assert "right middle lobe" in text and "left lower lobe" in text
    assert "mass" in ph.report.impression.lower()


def test_sampled_pathology_varies():
    rng = np.random.default_rng(0)
    drawn = [sample_pathology(rng) for _ in range(200)]
    assert {p.effusion for p in drawn} == {"none", "small", "moderate", "large"}
    assert 0.1 < np.mean([p.cardiomegaly for p in drawn]) < 0.4
    assert any(p.lesions for p in drawn) and any(p.consolidation for p in drawn)


def test_bad_parameters_name_the_value():
    with pytest.raises(ValueError, match="effusion='huge'"):
        PathologyParams(effusion="huge")
    with pytest.raises(ValueError, match="lobe 7"):
        PathologyParams(consolidation=[7])


def test_cli_writes_dataset_and_refuses_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", "--n", "2", "--size", "24", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    assert [r["id"] for r in rows] == ["phantom_0000", "phantom_0001"]
    assert set(rows[0]) == {"id", "ct", "lobes", "airway", "vessels", "findings", "impression"}
    for name in ("ct", "lobes", "airway", "vessels"):
        image = nib.load(out / rows[0][name])
        assert image.shape == (24, 24, 24) and np.allclose(image.header.get_zooms(), 256 / 24)
    assert nib.load(out / rows[0]["ct"]).get_data_dtype() == np.int16
    assert (out / "phantom_0000" / "truth.json").is_file()
    assert "FINDINGS:" in (out / "phantom_0000" / "report.txt").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert main(["phantom", "--n", "1", "--size", "24", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["phantom", "--n", "1", "--size", "24", "--out", str(out), "--overwrite"]) == 0


def test_same_anatomy_at_two_grid_sizes():
    params = PathologyParams(lesions=[Lesion(5, 20.0)])
    a, b = generate_phantom(32, seed=11, params=params), generate_phantom(64, seed=11, params=params)
    assert a.truth["lesions"][0]["center_mm"] == b.truth["lesions"][0]["center_mm"]
    assert abs(a.truth["lung_volume_ml"] / b.truth["lung_volume_ml"] - 1.0) < 0.1
    assert abs(a.truth["ctr"] - b.truth["ctr"]) < 0.06


def test_cli_error_names_the_directory(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "something.txt").write_text("x")
    assert main(["phantom", "--n", "1", "--size", "16", "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err


def test_overwrite_with_fewer_subjects_removes_the_old_ones(tmp_path):
    out = tmp_path / "ph"
    assert main(["phantom", "--n", "2", "--size", "16", "--out", str(out), "--workers", "2"]) == 0
    assert main(["phantom", "--n", "1", "--size", "16", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "phantom_0000"]


def test_phantom_report_without_the_volume(tmp_path):
    from medsyn.data.phantom import phantom_report, write_reports
    from medsyn.data.reports import read_reports

    assert phantom_report([4, 2]).text() == generate_phantom(8, seed=[4, 2]).report.text()
    rows = read_reports(write_reports(tmp_path / "reports.csv", 5, seed=4))
    assert [r["id"] for r in rows] == [f"phantom_{i:04d}" for i in range(5)]
    assert rows[2]["findings"] == phantom_report([4, 2]).findings
