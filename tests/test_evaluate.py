"""`medsyn evaluate` end to end: metrics.json contract, report, plots, audit, bad volumes, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_volumes import make_sample_folder

from medsyn.cli import main
from medsyn.data.phantom import write_dataset
from medsyn.evaluation.evaluate import EvaluateOptions, evaluate
from medsyn.evaluation.report import write_outputs

SIZE = 32
SAMPLE_KEYS = {"effusion_ml", "effusion_left_ml", "effusion_right_ml", "ctr", "laa950_pct", "lung_ml",
               "airway_mm3", "vessel_mm3", "nodules", "lobe_lung_dice", "nearest_train", "near_copy"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    real = write_dataset(root / "real", 4, size=SIZE, seed=11, progress=False)
    train = write_dataset(root / "train", 5, size=SIZE, seed=12, progress=False)
    samples = make_sample_folder(root / "samples", n=3, size=SIZE, seed=13)
    # a planted copy of a training volume, as a memorizing model would produce
    shutil.copytree(train / "phantom_0002", samples / "3", ignore=shutil.ignore_patterns("truth.json"))
    (samples / "3" / "meta.json").write_text(json.dumps({"prompt": "copied", "seed": 3}))
    return {"root": root, "real": real, "train": train, "samples": samples}


@pytest.fixture(scope="module")
def evaluation(data):
    options = EvaluateOptions(feature_size=32, slices_per_plane=4, progress=False)
    return evaluate(data["samples"], data["real"], data["train"], options, log=lambda _: None)


def test_metrics_contract(evaluation):
    m = evaluation.metrics
    assert set(m) >= {"samples", "real", "distribution", "summary"}
    assert list(m["samples"]) == ["0", "1", "2", "3"]
    for sample in m["samples"].values():
        assert SAMPLE_KEYS <= set(sample)
        assert set(sample["nearest_train"]) == {"id", "distance"}
    assert set(m["real"]) == {f"phantom_{i:04d}" for i in range(4)}
    assert "nearest_train" not in m["real"]["phantom_0000"]
    for key in ("effusion_ml", "ctr", "laa950_pct", "lung_ml", "airway_mm3", "vessel_mm3"):
        stat = m["summary"][key]
        assert set(stat) == {"samples", "real"} and set(stat["samples"]) == {"mean", "sd"}
        assert key in m["distribution"]["wasserstein"]
    json.dumps(m)  # all plain types


def test_planted_copy_flagged_and_nothing_else(evaluation):
    samples = evaluation.metrics["samples"]
    assert samples["3"]["near_copy"] and samples["3"]["nearest_train"] == {
        "id": "phantom_0002",
        "distance": 0.0,
    }
    assert not any(samples[k]["near_copy"] for k in ("0", "1", "2"))


def test_distances_name_their_features(evaluation):
    d = evaluation.metrics["distribution"]
    assert d["fid_3d"]["value"] >= 0 and d["mmd_3d"]["value"] is not None
    for key in ("fid_3d", "mmd_3d", "fid_25d"):
        assert "random" in d[key]["metric"] and "random" in d[key]["features"]  # no bare "FID" on random nets
    assert {"axial", "coronal", "sagittal", "mean"} <= set(d["fid_25d"])


def test_phantom_truth_compared(evaluation):
    truth = evaluation.metrics["truth"]["real"]
    assert set(truth) == set(evaluation.metrics["real"])
    row = truth["phantom_0001"]["ctr"]
    assert row["error"] == pytest.approx(row["measured"] - row["truth"])


def test_outputs_written_and_not_overwritten(evaluation, tmp_path):
    out = write_outputs(evaluation, tmp_path / "out", log=lambda _: None)
    for name in ("metrics.json", "report.md", "measures.png", "montage.png", "audit.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| measure |" in report and "random" in report and "1 of 4 samples flagged" in report
    assert json.loads((out / "metrics.json").read_text())["samples"]["3"]["near_copy"] is True
    with pytest.raises(Exception, match="already holds an evaluation"):
        write_outputs(evaluation, out, log=lambda _: None)
    (out / "mine.txt").write_text("user file")
    write_outputs(evaluation, out, overwrite=True, log=lambda _: None)
    assert (out / "mine.txt").read_text() == "user file"


def test_bad_volume_listed_and_rest_evaluated(data, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(data["samples"], samples)
    (samples / "1" / "ct.nii.gz").write_bytes(b"not a nifti file")
    options = EvaluateOptions(feature_size=32, slices_per_plane=4, progress=False)
    result = evaluate(samples, data["real"], options=options, log=lambda _: None)
    assert list(result.metrics["samples"]) == ["0", "2", "3"]
    (failed,) = result.metrics["failed"]
    assert failed["id"] == "1" and "cannot read as NIfTI" in failed["reason"]
    assert result.metrics["inputs"]["train_is_real"] is True


def test_cli_end_to_end_and_one_line_errors(data, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--samples", str(data["real"]), "--real", str(data["real"]), "--train",
            str(data["train"]), "--out", str(out), "--feature-size", "32"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # held-out volumes evaluated as samples: none is a near copy of a training volume
    assert not any(s["near_copy"] for s in metrics["samples"].values())
    assert metrics["inputs"]["feature_size"] == 32
    assert main(argv) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert main(["evaluate", "--samples", str(tmp_path / "nope"), "--real", str(data["real"]),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such folder" in err and not (tmp_path / "x").exists()
    assert main(["evaluate", "--samples", str(data["samples"]), "--real", str(data["real"]), "--out",
                 str(tmp_path / "y"), "--features", str(tmp_path / "missing.pth")]) == 2  # fmt: skip
    assert "missing.pth" in capsys.readouterr().err


def test_workers_give_the_same_metrics(data, evaluation):
    options = EvaluateOptions(feature_size=32, slices_per_plane=4, workers=2, progress=False)
    result = evaluate(data["samples"], data["real"], data["train"], options, log=lambda _: None)
    assert json.dumps(result.metrics, sort_keys=True) == json.dumps(evaluation.metrics, sort_keys=True)
