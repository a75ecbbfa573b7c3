"""`medsyn align-map` and `medsyn evaluate --align`: patch maps placed on the volume's own grid, the files
and their refusals, and the alignment score of samples against real matched and mismatched pairs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from test_volumes import make_sample_folder
from torch.nn import functional as F
from training_fixtures import align_overrides, make_cache, make_text_model

from medsyn.alignment import map_files
from medsyn.alignment.maps import PatchGeometry, align_grid, align_input, upsample_maps
from medsyn.alignment.run import load_align_run
from medsyn.cli import main
from medsyn.data.cache import load_array, write_manifest
from medsyn.data.channels import decode_volume
from medsyn.data.grid import Grid
from medsyn.data.nifti import spacing_affine
from medsyn.data.phantom import write_dataset
from medsyn.evaluation.volumes import load_volume, volume_ref
from medsyn.training.align import train_align
from medsyn.training.config import load_run_config

SIZE = 16  # the cache's high-resolution grid: 16^3 at 16 mm, base grid 8^3 (factor 2), patches of 4: 2^3
TEXT = "Large right pleural effusion."


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("align_map")
    cache = make_cache(base / "cache", n=16, size=SIZE, factor=2)
    write_manifest(cache, fractions=(0.5, 0.25, 0.25))
    run_dir = base / "run"
    train_align(
        load_run_config("align", None, align_overrides(cache, make_text_model(base / "bert"), run_dir))
    )
    samples = make_sample_folder(
        base / "samples", n=3, size=SIZE, prompts=[TEXT, "No acute abnormality.", "x"]
    )
    (samples / "2" / "meta.json").write_text(json.dumps({"index": 2, "seed": 2}))  # no prompt
    return {"base": base, "cache": cache, "run": run_dir, "samples": samples}


def _hot_patch(grid: tuple[int, ...], position: tuple[int, ...]) -> torch.Tensor:
    maps = torch.zeros(1, *grid)
    maps[(0, *position)] = 1.0
    return maps


# ---- geometry --------------------------------------------------------------------------------------
def test_a_patch_lands_on_its_voxel_box_and_world_position():
    affine = spacing_affine(2.0, (16, 16, 24))
    affine[:3, 3] += [10.0, -5.0, 30.0]
    geometry = PatchGeometry(affine, (16, 16, 24), stride=4, grid=(4, 4, 6))
    maps = _hot_patch(geometry.grid, (1, 2, 3))
    heat = upsample_maps(maps, geometry, (16, 16, 24), affine)[0]
    reference = F.interpolate(maps[None], scale_factor=4, mode="trilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(heat, reference.numpy(), atol=1e-6)  # trilinear, align_corners=False
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert [4 <= peak[0] < 8, 8 <= peak[1] < 12, 12 <= peak[2] < 16] == [True] * 3  # the patch's voxel box
    top = heat >= heat.max() - 1e-6  # the 2^3 voxels around the patch centre
    assert top.sum() == 8 and top[5:7, 9:11, 13:15].all()
    centre = geometry.centre(np.ravel_multi_index((1, 2, 3), geometry.grid))
    np.testing.assert_allclose(centre, (affine @ [5.5, 9.5, 13.5, 1.0])[:3])  # the box's middle, in mm
    ijk = np.stack(np.indices(heat.shape), -1).reshape(-1, 3)
    centroid = (heat.reshape(-1, 1) * ijk).sum(0) / heat.sum()
    np.testing.assert_allclose((affine @ [*centroid, 1.0])[:3], centre, atol=1e-4)


def test_maps_keep_world_positions_on_another_grid():
    source = spacing_affine(4.0, (24, 32, 24))  # x, z in [-46, 46] mm, y in [-62, 62] mm
    geometry = PatchGeometry(source, (24, 32, 24), stride=8, grid=(3, 4, 3))
    maps = _hot_patch(geometry.grid, (1, 2, 1))
    target = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS at half the spacing, a wider field of view
    target[:3, 3] = [63.0, 63.0, -63.0]
    heat = upsample_maps(maps, geometry, (64, 64, 64), target)[0]
    world = np.stack(np.indices(heat.shape), -1).reshape(-1, 3) @ target[:3, :3].T + target[:3, 3]  # (N, 3)
    lo, hi = (source @ [-0.5, -0.5, -0.5, 1])[:3], (source @ [23.5, 31.5, 23.5, 1])[:3]
    expected_inside = ((world >= lo) & (world <= hi)).all(1).reshape(heat.shape)
    np.testing.assert_array_equal(
        np.isfinite(heat), expected_inside
    )  # NaN where the align grid did not reach
    assert not expected_inside.all()
    centre = geometry.centre(np.ravel_multi_index((1, 2, 1), geometry.grid))
    np.testing.assert_allclose(centre, [0.0, 16.0, 0.0])
    peak = np.unravel_index(np.nanargmax(heat), heat.shape)
    assert np.abs((target @ [*peak, 1.0])[:3] - centre).max() <= 1.0  # within half a target voxel
    weights = np.nan_to_num(heat).reshape(-1, 1)
    np.testing.assert_allclose((weights * world).sum(0) / weights.sum(), centre, atol=1e-3)


def test_align_input_makes_the_cache_base_grid_and_a_reoriented_copy_the_same(assets):
    hr_grid = Grid((SIZE,) * 3, (16.0,) * 3, spacing_affine(16.0, (SIZE,) * 3))
    subject = assets["cache"] / "toy_000"
    volume = decode_volume(load_array(subject / "hr.npy", mmap=False))
    hu, masks = volume.pop("ct").astype(np.float32), volume
    affine = spacing_affine(16.0, hu.shape)
    data = align_input(hu, affine, masks, hr_grid, 2, 4)
    lr = torch.from_numpy(load_array(subject / "lr.npy", mmap=False).astype(np.float32))  # stored as float16
    assert data.x.shape == (4, 8, 8, 8) and data.geometry.grid == (2, 2, 2) and data.geometry.stride == 8
    torch.testing.assert_close(data.x, lr, atol=3e-3, rtol=0)  # as the cache made it, up to float16
    # the same volume stored left-right flipped (LPS axes) comes back the same, at the same world positions
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SIZE - 1
    flipped = align_input(
        hu[::-1].copy(), affine @ flip, {k: v[::-1].copy() for k, v in masks.items()}, hr_grid, 2, 4
    )
    torch.testing.assert_close(flipped.x, data.x, atol=1e-4, rtol=0)
    np.testing.assert_allclose(flipped.geometry.centre(5), data.geometry.centre(5), atol=1e-6)
    base = align_input(decode_volume(lr.numpy())["ct"].astype(np.float32), spacing_affine(32.0, (8,) * 3),
                       decode_volume(lr.numpy()), hr_grid, 2, 4)  # fmt: skip
    assert base.how == "on the align run's base grid" and base.geometry.stride == 4


# ---- medsyn align-map ------------------------------------------------------------------------------
def test_align_map_writes_maps_on_the_input_grid(assets, tmp_path, capsys):
    out = tmp_path / "maps"
    sample = assets["samples"] / "0"
    argv = [
        "align-map",
        "--align",
        str(assets["run"]),
        "--volume",
        str(sample),
        "--text",
        TEXT,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "4 words" in capsys.readouterr().out
    record = json.loads((out / "align_map.json").read_text())
    assert [w["word"] for w in record["words"]] == ["Large", "right", "pleural", "effusion"]
    assert record["align_run"]["sha256"] == load_align_run(assets["run"]).sha256
    assert record["align_grid"]["patch_grid"] == [2, 2, 2] and record["volume"]["shape"] == [SIZE] * 3
    ct = nib.load(sample / "ct.nii.gz")
    run = load_align_run(assets["run"])
    volume = load_volume(volume_ref(sample))
    data = align_input(volume.hu, volume.affine, volume.masks, *align_grid(run), run.patch_size)
    global_, patches, _ = run.encode_volumes(data.x[None])
    report, _, words = run.encode_reports([TEXT])
    similarity = words[0] @ patches[0].T  # (W, P)
    assert record["scores"]["global"] == pytest.approx(float(report[0] @ global_[0]), abs=1e-5)
    assert record["scores"]["fine"] == pytest.approx(float(similarity.amax(1).mean()), abs=1e-5)
    for w, word in enumerate(record["words"]):
        image = nib.load(out / word["map"])
        np.testing.assert_allclose(image.affine, ct.affine)  # overlays the input CT
        assert image.shape == ct.shape and image.get_data_dtype() == np.float32
        heat = np.asarray(image.dataobj)
        assert word["max_similarity"] == pytest.approx(float(similarity[w].max()), abs=1e-5)
        assert word["patch"]["index"] == int(similarity[w].argmax())
        assert heat[tuple(word["voxel"])] == pytest.approx(word["map_value"])
        # trilinear values never exceed the best patch; the voxel is within half a voxel (8 mm) of its centre
        assert np.nanmax(heat) <= word["max_similarity"] + 1e-5
        np.testing.assert_allclose(word["world_mm"], (ct.affine @ [*word["voxel"], 1.0])[:3], atol=1e-3)
        assert np.abs(np.subtract(word["world_mm"], word["patch"]["centre_world_mm"])).max() <= 8.0
        assert (out / word["preview"]).stat().st_size > 0
    assert record["words"][3]["map"] == "03_effusion.nii.gz"
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir())
    assert (out / "summary.png").stat().st_size > 0


def test_a_nifti_file_with_some_masks_gets_the_others_segmented(assets, tmp_path):
    sample = assets["samples"] / "1"
    ct = tmp_path / "scan.nii.gz"
    ct.write_bytes((sample / "ct.nii.gz").read_bytes())
    argv = ["align-map", "--align", str(assets["run"]), "--volume", str(ct), "--mask",
            f"lobes={sample / 'lobes.nii.gz'}", "--text", "Heart enlarged.", "--out", str(tmp_path / "m")]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "m" / "align_map.json").read_text())
    assert record["align_grid"]["input"].endswith("airway, vessels segmented")
    assert record["volume"]["source"] == str(ct) and len(record["words"]) == 2


def test_out_folder_is_written_whole_and_refused_unless_overwrite(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "maps"
    argv = [
        "align-map",
        "--align",
        str(assets["run"]),
        "--volume",
        str(assets["samples"] / "1"),
        "--out",
        str(out),
    ]
    assert main([*argv, "--text", TEXT]) == 0
    assert main([*argv, "--text", TEXT]) == 2
    assert "already holds an align map" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--text", "Small effusion.", "--overwrite"]) == 0  # fewer words: old maps removed
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "00_Small.nii.gz" in names and "03_effusion.nii.gz" not in names
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    assert main([*argv[:-1], str(other), "--text", TEXT]) == 2
    assert "holds no align map" in capsys.readouterr().err
    assert {p.name for p in other.iterdir()} == {"data.csv"}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(map_files, "render_heat", fail)  # a failure midway leaves nothing behind
    with pytest.raises(RuntimeError, match="disk full"):
        main([*argv[:-1], str(tmp_path / "new"), "--text", TEXT])
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))


def test_cli_errors_are_one_line(assets, tmp_path, capsys):
    sample = str(assets["samples"] / "0")
    cases = [
        (["--align", str(tmp_path / "norun"), "--volume", sample], "norun: no such run directory"),
        (
            ["--align", str(assets["run"]), "--volume", str(tmp_path / "none.nii.gz")],
            "no such volume file or folder",
        ),
        (["--align", str(assets["run"]), "--volume", sample, "--mask", "heart=x.nii.gz"], "unknown channel"),
    ]
    for args, message in cases:
        assert main(["align-map", *args, "--text", TEXT, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


# ---- medsyn evaluate --align -----------------------------------------------------------------------
def test_evaluate_scores_samples_against_matched_and_mismatched_real_pairs(assets, tmp_path):
    real = write_dataset(tmp_path / "real", 3, size=SIZE, seed=3, progress=False)
    out = tmp_path / "eval"
    argv = ["evaluate", "--samples", str(assets["samples"]), "--real", str(real), "--out", str(out),
            "--align", str(assets["run"]), "--feature-size", "16", "--slices-per-plane", "1"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    alignment = metrics["alignment"]
    assert set(alignment["samples"]) == {"0", "1"} and set(alignment["real"]) == {
        f"phantom_{i:04d}" for i in range(3)
    }
    (skipped,) = alignment["skipped"]
    assert skipped["id"] == "2" and "no prompt" in skipped["reason"]
    for group in ("samples", "real_matched", "real_mismatched"):
        for score in ("global", "fine"):
            stat = alignment["summary"][group][score]
            assert set(stat) == {"mean", "se", "n"} and -1.0 <= stat["mean"] <= 1.0 and stat["se"] >= 0.0
    assert alignment["summary"]["real_mismatched"]["global"]["n"] == 3
    values = [s["global"] for s in alignment["samples"].values()]
    assert alignment["summary"]["samples"]["global"]["mean"] == pytest.approx(np.mean(values))
    assert metrics["samples"]["0"]["alignment"] == alignment["samples"]["0"]
    assert alignment["align_run"]["sha256"] == load_align_run(assets["run"]).sha256
    # sample 0, scored directly
    run = load_align_run(assets["run"])
    volume = load_volume(volume_ref(assets["samples"] / "0"))
    data = align_input(volume.hu, volume.affine, volume.masks, *align_grid(run), run.patch_size)
    global_, patches, _ = run.encode_volumes(data.x[None])
    report, _, words = run.encode_reports([TEXT])
    assert alignment["samples"]["0"]["global"] == pytest.approx(float(report[0] @ global_[0]), abs=1e-5)
    assert alignment["samples"]["0"]["fine"] == pytest.approx(
        float((words[0] @ patches[0].T).amax(1).mean()), abs=1e-5
    )
    report_md = (out / "report.md").read_text()
    assert (
        "## Report-volume alignment" in report_md
        and "mismatched" in report_md
        and "`2` (samples: no prompt" in report_md
    )
