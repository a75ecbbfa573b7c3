"""The alignment stage on radiographs (2D patches) with the 3D code: the patch encoder in 2D, `train.py
align` on a radiograph cache, the run's reload, the codebook's 2D boxes and pixels, retrieval without the
subject's own keypatches, `keypatch_crops`, and the `medsyn codebook build` / `medsyn keypatches` commands."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cxr_fixtures import make_radiographs
from training_fixtures import REPORTS, align_overrides, make_text_model

from medsyn.alignment import (
    Codebook,
    VolumeEncoder,
    keypatch_crops,
    load_align_run,
    patch_box,
    retrieve_for_report,
)
from medsyn.alignment.codebook import JSON_FILE, SHEET_FILE, check_pairs
from medsyn.alignment.data import PairCache, cache_kind
from medsyn.alignment.model import sincos_position_embedding
from medsyn.cli import main
from medsyn.data.datamodule import report_text
from medsyn.errors import ConfigError, DataError
from medsyn.radiograph.cache import (
    load_image,
    read_radiograph_manifest,
)
from medsyn.training.align import check_cache, train_align
from medsyn.training.config import load_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, PATCH, GRID = 32, 8, (4, 4)  # 32^2 radiographs, 8^2-pixel patches: a 4 x 4 patch grid
OVERRIDES = {"model.spatial_dims": 2, "model.in_channels": 1, "model.patch_size": PATCH}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("align2d")
    cache = make_radiographs(base / "cxr")
    bert = make_text_model(base / "bert")
    cfg = load_run_config("align", None, align_overrides(cache, bert, base / "run", **OVERRIDES))
    run_dir = train_align(cfg)
    run = load_align_run(run_dir)
    codebook = Codebook.build(run, cache, k1=6, k2=40, batch_size=3, progress=False)
    return {"cache": cache, "bert": bert, "base": base, "run_dir": run_dir, "run": run, "codebook": codebook}


def test_the_patch_encoder_works_on_a_2d_grid():
    encoder = VolumeEncoder(spatial_dims=2, in_channels=1, patch_size=8, stem_channels=8, width=24, depth=1,
                            num_heads=2, mlp_ratio=2.0)  # fmt: skip
    tokens, grid = encoder(torch.randn(2, 1, 32, 16))
    assert grid == (4, 2) and tokens.shape == (2, 8, 24)
    assert isinstance(encoder.stem[0], torch.nn.Conv2d)
    table = sincos_position_embedding((4, 2), 24)  # 12 channels per axis, all used
    assert table.shape == (8, 24) and len({tuple(row.tolist()) for row in table}) == 8  # distinct positions
    assert torch.equal(table[0, :6], torch.zeros(6)) and torch.equal(table[0, 6:12], torch.ones(6))  # row 0
    assert patch_box(5, (4, 2), 8) == (slice(16, 24), slice(8, 16))
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        encoder(torch.randn(2, 1, 32, 16, 8))
    with pytest.raises(ValueError, match="spatial_dims=1"):
        VolumeEncoder(spatial_dims=1)
    # the 3D default is unchanged: CT runs saved before spatial_dims existed rebuild the same model
    assert isinstance(VolumeEncoder(patch_size=4, width=24, num_heads=2, depth=0).stem[0], torch.nn.Conv3d)


def test_align_trains_on_a_radiograph_cache_and_reloads(built):
    run, run_dir = built["run"], built["run_dir"]
    assert cache_kind(built["cache"]) == "radiograph"
    assert run.spatial_dims == 2 and run.in_channels == 1 and run.config["model"]["spatial_dims"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    held_out = read_radiograph_manifest(built["cache"], metrics["split"])
    assert metrics["subjects"] == len(held_out) >= 2 and metrics["global_step"] == 2
    assert 0.0 <= metrics["report_to_volume_top1"] <= 1.0

    row = held_out[0]
    x = torch.from_numpy(load_image(row))[None]  # (1, 1, S, S)
    global_, patches, grid = run.encode_volumes(x)
    assert grid == GRID and patches.shape == (1, 16, 16) and global_.shape == (1, 16)
    assert torch.allclose(patches.norm(dim=-1), torch.ones(1, 16), atol=1e-5)
    again = load_align_run(run_dir).encode_volumes(x)[1]
    assert torch.equal(patches, again)  # the exported weights reload to the same model


def test_the_model_must_match_the_cache_kind(built):
    data = PairCache.open(built["cache"])
    assert (data.spatial_dims, data.channels) == (2, 1)
    overrides = align_overrides(
        built["cache"], built["bert"], built["base"] / "x"
    )  # a CT model: the defaults
    with pytest.raises(ConfigError, match="model.spatial_dims=3, model.in_channels=4: .* radiograph cache"):
        check_cache(load_run_config("align", None, overrides), data)
    bad_patch = align_overrides(built["cache"], built["bert"], built["base"] / "x", **{**OVERRIDES,
                                "model.patch_size": 6})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.patch_size=6: does not divide the image grid \(32, 32\)"):
        check_cache(load_run_config("align", None, bad_patch), data)
    ct_run = SimpleNamespace(spatial_dims=3, in_channels=4, run_dir=Path("runs/ct"))
    with pytest.raises(DataError, match="a radiograph cache .* trained on CT volumes"):
        check_pairs(ct_run, data)


def test_the_codebook_holds_2d_boxes_and_the_source_pixels(built, tmp_path):
    codebook, cache = built["codebook"], built["cache"]
    rows = {r["id"]: r for r in read_radiograph_manifest(cache)}
    assert codebook.spatial_dims == 2 and codebook.info["grid"] == list(GRID)
    assert codebook.info["kind"] == "radiograph"
    assert codebook.patches.shape == (len(codebook), 1, PATCH, PATCH)
    for i, kp in enumerate(codebook.keypatches):
        assert rows[kp.subject]["split"] == "train"
        assert len(kp.box) == 2 and kp.slices == patch_box(kp.patch_index, GRID, PATCH)
        pixels = torch.from_numpy(load_image(rows[kp.subject])[(slice(None), *kp.slices)])
        assert torch.equal(codebook.patches[i].float(), pixels)
    codebook.save(tmp_path / "cb")
    loaded = Codebook.load(tmp_path / "cb")
    assert loaded.keypatches == codebook.keypatches and torch.equal(loaded.patches, codebook.patches)
    assert loaded.spatial_dims == 2

    from medsyn.alignment.sheet import keypatch_sheet

    image = keypatch_sheet(codebook, {s: load_image(r) for s, r in rows.items()}, words=3, per_word=2)
    assert image.dtype == np.uint8 and image.ndim == 3 and float(image.std()) > 1.0


def test_retrieval_excludes_the_subjects_own_keypatches(built):
    codebook, run = built["codebook"], built["run"]
    text = run.config["data"]["text"]
    subjects = {kp.subject for kp in codebook.keypatches}
    assert len(subjects) >= 2
    for row in read_radiograph_manifest(built["cache"], "train"):
        if row["id"] not in subjects:
            continue
        report = report_text(row, text)
        words, everything = retrieve_for_report(codebook, run, report, k3=len(codebook))
        assert words and everything.indices.shape == (len(words), len(codebook))
        _, found = retrieve_for_report(codebook, run, report, k3=len(codebook), exclude_subject=row["id"])
        own = sum(kp.subject == row["id"] for kp in codebook.keypatches)
        assert own >= 1 and found.indices.shape == (len(words), len(codebook) - own)
        assert all(codebook.keypatches[i].subject != row["id"] for i in found.unique())


def test_keypatch_crops_are_the_source_pixels(built):
    codebook, cache = built["codebook"], built["cache"]
    indices = [3, 0, 3, len(codebook) - 1]
    crops = keypatch_crops(codebook, indices)
    assert crops.shape == (4, 1, PATCH, PATCH) and crops.dtype == torch.float32
    rows = {r["id"]: r for r in read_radiograph_manifest(cache)}
    for crop, i in zip(crops, indices, strict=True):
        kp = codebook.keypatches[i]
        assert torch.equal(crop, torch.from_numpy(load_image(rows[kp.subject])[(slice(None), *kp.slices)]))
    assert torch.equal(keypatch_crops(codebook, torch.tensor(indices), cache), crops)  # re-cut from the cache
    assert keypatch_crops(codebook, []).shape == (0, 1, PATCH, PATCH)
    with pytest.raises(ValueError, match="outside the codebook"):
        keypatch_crops(codebook, [len(codebook)])
    with pytest.raises(DataError, match="no cache manifest"):
        keypatch_crops(codebook, [0], built["base"] / "nothing")


def test_the_commands_build_and_retrieve_on_radiographs(built, tmp_path):
    out = tmp_path / "cb"
    assert main(["codebook", "build", "--align", str(built["run_dir"]), "--data", str(built["cache"]),
                 "--out", str(out), "--k1", "6", "--k2", "40", "--batch-size", "5"]) == 0  # fmt: skip
    codebook = Codebook.load(out)
    where = [(kp.subject, kp.patch_index, kp.word) for kp in codebook.keypatches]
    assert where == [(kp.subject, kp.patch_index, kp.word) for kp in built["codebook"].keypatches]
    assert (out / SHEET_FILE).is_file()  # another batch size: the same keypatches (scores to float error)
    data = json.loads((out / JSON_FILE).read_text())
    assert data["kind"] == "radiograph" and all(len(r["box"]) == 2 for r in data["keypatches"])

    subject = codebook.keypatches[0].subject
    found = tmp_path / "kp.json"
    args = ["--prompt", REPORTS[0][0], "--k3", "2", "--exclude-subject", subject, "--out", str(found)]
    assert main(["keypatches", "--align", str(built["run_dir"]), "--codebook", str(out), *args]) == 0
    result = json.loads(found.read_text())
    hits = [hit for word in result["words"] for hit in word["keypatches"]]
    assert hits and all(len(hit["box"]) == 2 and hit["subject"] != subject for hit in hits)
