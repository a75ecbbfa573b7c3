"""medsyn evaluate-cxr on a tiny radiograph cache whose findings a small CNN learns in a few steps."""

import json
from itertools import count

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from medsyn.cli import main
from medsyn.data.cache import split_for
from medsyn.evaluation.features import random_resnet
from medsyn.radiograph.cache import write_radiograph, write_radiograph_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
FRACTIONS = (0.6, 0.0, 0.4)  # train / val / test: no val split
COMBOS = [(e, c) for e in ("none", "left", "right", "bilateral") for c in (False, True)]
REPORTS = {
    "none": "No pleural effusion.",
    "left": "Small left pleural effusion.",
    "right": "Moderate right-sided pleural effusion.",
    "bilateral": "Bilateral pleural effusions.",
}


def radiograph(effusion: str, cardiomegaly: bool, rng: np.random.Generator) -> np.ndarray:
    """Dark lungs; an effusion is a bright lower band on its side (the patient's right on the image's left,
    as a film is read), cardiomegaly a wide bright centre."""
    x = np.full((SIZE, SIZE), -0.6, np.float32) + rng.normal(0, 0.05, (SIZE, SIZE)).astype(np.float32)
    half = SIZE // 2
    if effusion in ("right", "bilateral"):
        x[2 * SIZE // 3 :, : half - 4] = 0.8
    if effusion in ("left", "bilateral"):
        x[2 * SIZE // 3 :, half + 4 :] = 0.8
    width = 7 if cardiomegaly else 2
    x[SIZE // 3 : 2 * SIZE // 3, half - width : half + width] = 0.6
    return np.clip(x, -1, 1)


def report(effusion: str, cardiomegaly: bool) -> tuple[str, str]:
    heart = "The heart is enlarged." if cardiomegaly else "Heart size is normal."
    return f"{REPORTS[effusion]} {heart}", "Cardiomegaly." if cardiomegaly else "No acute process."


def _ids(split: str, n: int, taken: set) -> list[str]:
    found = []
    for k in count():
        name = f"cxr{k:03d}"
        if name not in taken and split_for(name, FRACTIONS) == split:
            found.append(name)
            taken.add(name)
            if len(found) == n:
                return found


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """16 training images (each finding combination twice) and 8 test images (each once)."""
    root = tmp_path_factory.mktemp("cxr_cache")
    rng = np.random.default_rng(0)
    taken: set = set()
    for split, repeats in (("train", 2), ("test", 1)):
        for name, (effusion, cardiomegaly) in zip(
            _ids(split, len(COMBOS) * repeats, taken), COMBOS * repeats, strict=True
        ):
            findings, impression = report(effusion, cardiomegaly)
            meta = {"findings": findings, "impression": impression, "kind": "drr",
                    "labels": {"effusion": effusion, "cardiomegaly": cardiomegaly}}  # fmt: skip
            write_radiograph(root, name, radiograph(effusion, cardiomegaly, rng), meta)
    write_radiograph_manifest(root, FRACTIONS)
    return root


def write_png16(path, image: np.ndarray) -> None:
    Image.fromarray(np.round((np.clip(image, -1, 1) + 1) / 2 * 65535).astype(np.uint16)).save(path)


def write_samples(folder, items) -> None:
    """`sample.py --cxr` style folders: <index>/image.png (16-bit) and meta.json."""
    for i, (image, prompt) in enumerate(items):
        d = folder / str(i)
        d.mkdir(parents=True)
        write_png16(d / "image.png", image)
        (d / "meta.json").write_text(json.dumps({"prompt": prompt, "seed": i, "generator": "lm"}))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A faithful set (images showing what their prompts say) and a blank set (nothing drawn)."""
    root = tmp_path_factory.mktemp("cxr_samples")
    rng = np.random.default_rng(1)
    faithful = [(radiograph(e, c, rng), " ".join(report(e, c))) for e, c in COMBOS]
    blank = [(radiograph("none", False, rng), " ".join(report(e, c))) for e, c in COMBOS]
    write_samples(root / "faithful", faithful)
    write_samples(root / "blank", blank)
    return root


def evaluate(cache, samples, out, *extra):
    return main(["evaluate-cxr", "--samples", str(samples / "faithful"), "--samples", str(samples / "blank"),
                 "--real", str(cache), "--train", str(cache), "--out", str(out), "--size", str(SIZE),
                 "--epochs", "25", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(cache, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr_eval") / "eval"
    assert evaluate(cache, samples, out) == 0
    return out


def test_outputs_and_metrics_keys(evaluated):
    for name in ("metrics.json", "report.md", "montage.png", "confusion.png"):
        assert (evaluated / name).is_file(), name
    assert (evaluated / "classifier" / "classifier.safetensors").is_file()
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics["samples"]) == {"faithful", "blank"}
    for s in metrics["samples"].values():
        assert s["n"] == len(COMBOS)
        assert s["fid"] >= 0 and "random features" in s["metric_fid"]
        for finding in ("effusion", "cardiomegaly"):
            assert {"accuracy", "balanced_accuracy", "recall", "confusion"} <= set(s["findings"][finding])
    assert metrics["real"]["n"] == len(COMBOS)
    assert metrics["real"]["report_label_agreement"]["effusion"] == {"n": 8, "agree": 8}
    assert "random" in metrics["features"]["label"]
    report = (evaluated / "report.md").read_text()
    assert "random features" in report and "medsyn evaluate-cxr --samples" in report


def test_classifier_learns_the_findings(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    reference = metrics["real"]["reference"]
    assert reference["effusion"]["balanced_accuracy"] > 0.5  # chance 0.25
    assert reference["cardiomegaly"]["balanced_accuracy"] > 0.75  # chance 0.5
    faithful = metrics["samples"]["faithful"]["findings"]
    blank = metrics["samples"]["blank"]["findings"]
    # images that show their prompts' findings score well above images that show none
    assert faithful["effusion"]["accuracy"] > blank["effusion"]["accuracy"]
    assert faithful["cardiomegaly"]["balanced_accuracy"] > blank["cardiomegaly"]["balanced_accuracy"]
    assert np.asarray(blank["effusion"]["confusion"])[:, 1:].sum() <= 1  # blank images: predicted "none"


def test_rerun_reuses_the_classifier_and_needs_overwrite(cache, samples, evaluated, capsys):
    assert evaluate(cache, samples, evaluated) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert evaluate(cache, samples, evaluated, "--overwrite") == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["classifier"]["reused"] is True


def test_trained_features_and_a_shared_classifier(cache, samples, evaluated, tmp_path):
    """--features names the FID plainly; --classifier elsewhere is reused, and retrained for new settings."""
    net, _ = random_resnet(2, seed=1, depth=18)
    weights = tmp_path / "resnet18_2d.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    shared = tmp_path / "classifier"
    assert (
        evaluate(cache, samples, tmp_path / "a", "--classifier", str(shared), "--features", str(weights)) == 0
    )
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["samples"]["faithful"]["metric_fid"] == "FID" and metrics["features"]["trained"] is True
    assert metrics["classifier"]["reused"] is False and (shared / "classifier.json").is_file()
    assert evaluate(cache, samples, tmp_path / "b", "--classifier", str(shared)) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["classifier"]["reused"] is True
    assert evaluate(cache, samples, tmp_path / "c", "--classifier", str(shared), "--seed", "1") == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["classifier"]["reused"] is False
    assert json.loads((shared / "classifier.json").read_text())["seed"] == 1


def _bad_set(tmp_path, samples, name):
    bad = tmp_path / name
    write_samples(bad, [(np.zeros((SIZE, SIZE), np.float32), "No pleural effusion.")] * 2)
    return bad


def test_bad_inputs_are_one_line_errors(cache, samples, tmp_path, capsys):
    def run(sample_dir, *extra):
        code = main(["evaluate-cxr", "--samples", str(sample_dir), "--real", str(cache), "--train", str(cache),
                     "--out", str(tmp_path / "out"), "--size", str(SIZE), "--epochs", "1", *extra])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    missing = _bad_set(tmp_path, samples, "missing")
    (missing / "1" / "image.png").unlink()
    assert str(missing / "1" / "image.png") in run(missing)

    eight_bit = _bad_set(tmp_path, samples, "eight_bit")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(eight_bit / "0" / "image.png")
    assert "16-bit grayscale" in run(eight_bit) and str(eight_bit / "0" / "image.png") in run(eight_bit)

    no_prompt = _bad_set(tmp_path, samples, "no_prompt")
    (no_prompt / "0" / "meta.json").write_text(json.dumps({"seed": 0}))
    assert "prompt" in run(no_prompt) and str(no_prompt / "0" / "meta.json") in run(no_prompt)

    good = samples / "faithful"
    assert "no images in split 'val'" in run(good, "--real-split", "val")
    assert "no sample folders" in run(tmp_path / "missing" / "1")

    user_folder = tmp_path / "user_folder"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("mine")
    assert "not a medsyn classifier folder" in run(good, "--classifier", str(user_folder))
    assert (user_folder / "notes.txt").read_text() == "mine"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.json").write_text("{}")
    code = main(["evaluate-cxr", "--samples", str(good), "--real", str(cache), "--train", str(cache),
                 "--out", str(foreign), "--overwrite"])  # fmt: skip
    assert code == 2 and "did not write" in capsys.readouterr().err
