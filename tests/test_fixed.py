"""Marginalized sampling: fixed channels come back exactly, bad --fix files are refused, RePaint rounds."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_sample import FAST, SIZE, make_runs, run_sample

from medsyn.data.channels import CHANNELS, LOBE_LEVELS, decode_volume
from medsyn.data.nifti import save_nifti, spacing_affine
from medsyn.diffusion import HoldFixed, build_schedule, sample, time_grid
from medsyn.errors import DataError
from medsyn.generation.fixed import load_fixed, parse_fix
from medsyn.generation.run import load_run
from medsyn.generation.segment import segment_with_model
from medsyn.generation.stages import SampleOptions, synthesize

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPACING = 256.0 / SIZE
HR_AFFINE = spacing_affine(SPACING, (SIZE,) * 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = make_runs(root)
    out["base_run"], out["sr_run"] = load_run(out["base"]), load_run(out["sr"])
    return out


@pytest.fixture(scope="module")
def bits_runs(tmp_path_factory):
    """Runs whose networks denoise the lobes as three analog bits."""
    out = make_runs(tmp_path_factory.mktemp("bits_runs"), lobe_encoding="bits")
    out["base_run"], out["sr_run"] = load_run(out["base"]), load_run(out["sr"])
    return out


def volumes(size: int = SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """Natural-unit volumes on a (size,)^3 grid: HU in the window, lobe labels, binary masks."""
    rng = np.random.default_rng(seed)
    shape = (size,) * 3
    return {
        "ct": rng.integers(-1024, 601, shape).astype(np.int16),
        "lobes": rng.integers(0, 6, shape).astype(np.uint8),
        "airway": (rng.random(shape) < 0.2).astype(np.uint8),
        "vessels": (rng.random(shape) < 0.3).astype(np.uint8),
    }


def write_fix(tmp_path, vols, names, affine=HR_AFFINE) -> list[str]:
    args = []
    for name in names:
        path = tmp_path / f"fix_{name}.nii.gz"
        save_nifti(path, vols[name], affine, dtype=vols[name].dtype)
        args += ["--fix", f"{name}={path}"]
    return args


@pytest.mark.parametrize("name", CHANNELS)
@pytest.mark.parametrize("with_sr", [False, True])
def test_each_fixed_channel_comes_back_unchanged(runs, name, with_sr):
    base, sr = runs["base_run"], runs["sr_run"] if with_sr else None
    grid = sr.grid if with_sr else base.grid
    vols = volumes(grid.shape[0])
    fixed = load_fixed({name: _saved(runs, vols, name, grid)}, grid, base.hr_grid, base.factor)
    x = synthesize(base, sr, ["Normal."], [0], SampleOptions(steps=2, sr_steps=2), fixed)
    out = decode_volume(x[0].numpy())
    np.testing.assert_array_equal(out[name], vols[name])
    free = [c for c in CHANNELS if c != name]
    assert any(not np.array_equal(out[c], vols[c]) for c in free)  # the others are generated


@pytest.mark.parametrize("name", ["lobes", "vessels"])
@pytest.mark.parametrize("with_sr", [False, True])
def test_fixed_channels_come_back_unchanged_from_bits_runs(bits_runs, name, with_sr):
    base, sr = bits_runs["base_run"], bits_runs["sr_run"] if with_sr else None
    assert base.model.out_channels == 6 and base.model.lobe_encoding == "bits"
    grid = sr.grid if with_sr else base.grid
    vols = volumes(grid.shape[0], seed=7)
    fixed = load_fixed({name: _saved(bits_runs, vols, name, grid)}, grid, base.hr_grid, base.factor)
    x = synthesize(base, sr, ["Normal."], [0], SampleOptions(steps=2, sr_steps=2), fixed)
    assert x.shape == (1, 4, *grid.shape)  # the four volume channels, lobes as levels
    out = decode_volume(x[0].numpy())
    np.testing.assert_array_equal(out[name], vols[name])
    assert np.isin(x[0, 1].numpy(), LOBE_LEVELS).all()  # bits come back as the levels of valid codes


def _saved(runs, vols, name, grid):
    path = runs["cache"].parent / f"{name}_{grid.shape[0]}.nii.gz"
    save_nifti(path, vols[name], grid.affine, dtype=vols[name].dtype)
    return path


@pytest.mark.parametrize("with_sr", [False, True])
def test_fixed_subset_comes_back_at_the_file_level(runs, tmp_path, with_sr):
    vols = volumes(SIZE if with_sr else SIZE // 4, seed=3)
    affine = HR_AFFINE if with_sr else runs["base_run"].grid.affine
    fix = write_fix(tmp_path, vols, ["lobes", "airway"], affine)
    sr = ["--sr", runs["sr"]] if with_sr else []
    out = tmp_path / "out"
    assert run_sample("--base", runs["base"], *sr, "--prompt", "x", "--out", out, *fix, *FAST) == 0
    for name in ("lobes", "airway"):
        written = np.asarray(nib.load(out / "0" / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(written, vols[name])
    meta = json.loads((out / "0" / "meta.json").read_text())
    assert set(meta["fixed"]) == {"lobes", "airway"} and len(meta["fixed"]["lobes"]["sha256"]) == 64


def test_hr_file_is_downsampled_like_the_cache_for_the_base_stage(runs):
    base = runs["base_run"]
    vols = volumes(SIZE)
    path = runs["cache"].parent / "hr_lobes.nii.gz"
    save_nifti(path, vols["lobes"], HR_AFFINE, dtype=np.uint8)
    fixed = load_fixed({"lobes": path}, base.grid, base.hr_grid, base.factor)
    n = SIZE // 4
    blocks = vols["lobes"].reshape(n, 4, n, 4, n, 4).transpose(0, 2, 4, 1, 3, 5).reshape(n, n, n, 64)
    majority = np.apply_along_axis(lambda b: np.bincount(b, minlength=6).argmax(), -1, blocks)  # ties: lower
    np.testing.assert_array_equal(fixed.values["lobes"], majority)
    assert "4^3 block" in fixed.sources["lobes"]["grid"]


def test_scan_at_its_own_spacing_is_brought_onto_the_grid(runs, tmp_path):
    sr = runs["sr_run"]
    lobes = np.zeros((2 * SIZE,) * 3, np.uint8)  # twice as fine, LPS-oriented
    lobes[SIZE:, :, :] = 3
    affine = spacing_affine(SPACING / 2, lobes.shape) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    save_nifti(tmp_path / "scan.nii.gz", lobes, affine, dtype=np.uint8)
    fixed = load_fixed({"lobes": tmp_path / "scan.nii.gz"}, sr.grid)
    assert fixed.values["lobes"].shape == (SIZE,) * 3 and set(np.unique(fixed.values["lobes"])) == {0, 3}
    assert "resampled" in fixed.sources["lobes"]["grid"]


def _bad_files(tmp_path):
    vols = volumes()
    labels = vols["lobes"].copy()
    labels[0, 0, 0] = 7
    save_nifti(tmp_path / "labels.nii.gz", labels, HR_AFFINE, dtype=np.uint8)
    mask = vols["airway"].copy()
    mask[0, 0, 0] = 2
    save_nifti(tmp_path / "mask.nii.gz", mask, HR_AFFINE, dtype=np.uint8)
    save_nifti(tmp_path / "small.nii.gz", vols["lobes"][:3, :3, :3], np.eye(4), dtype=np.uint8)
    save_nifti(tmp_path / "norm.nii.gz", np.zeros((SIZE,) * 3, np.float32), HR_AFFINE)
    good = tmp_path / "good.nii.gz"
    save_nifti(good, vols["lobes"], HR_AFFINE, dtype=np.uint8)
    (tmp_path / "trunc.nii.gz").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    return {
        "labels": (["lobes=labels.nii.gz"], "labels.nii.gz: lobes labels [7]"),
        "mask": (["airway=mask.nii.gz"], "expected a binary mask"),
        "shape": (["lobes=small.nii.gz"], "cannot be brought onto the run's grid"),
        "normalized ct": (["ct=norm.nii.gz"], "expected Hounsfield units"),
        "truncated": (["vessels=trunc.nii.gz"], "trunc.nii.gz: cannot read as NIfTI"),
        "not nifti": (["vessels=text.nii.gz"], "text.nii.gz: cannot read as NIfTI"),
        "missing": (["ct=none.nii.gz"], "none.nii.gz: no such file"),
        "unknown channel": (["heart=good.nii.gz"], "unknown channel 'heart'"),
        "twice": (["lobes=good.nii.gz", "lobes=labels.nii.gz"], "given twice"),
        "no path": (["lobes"], "expected CHANNEL=PATH"),
    }


def test_bad_fix_files_get_one_line_errors_and_write_nothing(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for case, (specs, message) in _bad_files(tmp_path).items():
        fix = [a for s in specs for a in ("--fix", s)]
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        rc = run_sample(
            "--base", runs["base"], "--sr", runs["sr"], "--prompt", "x", "--out", out, *fix, *FAST
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2, case
        assert message in err and len(err.splitlines()) == 1, (case, err)
        assert not out.exists(), case
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_hold_fixed_is_forward_noise_and_exact_at_zero():
    schedule = build_schedule("cosine")
    fixed = torch.linspace(-1, 1, 8).reshape(1, 1, 2, 2, 2)
    hold = HoldFixed(fixed, [1], schedule, [torch.Generator().manual_seed(0)])
    x = torch.zeros(1, 4, 2, 2, 2)
    at_zero = hold(x, torch.zeros(1))
    assert torch.equal(at_zero[:, 1:2], fixed) and torch.equal(at_zero[:, [0, 2, 3]], x[:, [0, 2, 3]])
    t = torch.full((1,), 0.5)
    noise = torch.randn(1, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hold(x, t)[:, 1:2], schedule.add_noise(fixed, t, noise))


def test_resampling_rounds_keep_fixed_channels_and_change_the_rest(runs):
    base = runs["base_run"]
    vols = volumes(base.grid.shape[0], seed=5)
    fixed = load_fixed({"lobes": _saved(runs, vols, "lobes", base.grid)}, base.grid)
    opts = {"steps": 3, "sampler": "ancestral"}
    plain = synthesize(base, None, ["x"], [1], SampleOptions(**opts), fixed)
    rounds = synthesize(base, None, ["x"], [1], SampleOptions(**opts, resample_rounds=2), fixed)
    np.testing.assert_array_equal(decode_volume(rounds[0].numpy())["lobes"], vols["lobes"])
    assert not torch.allclose(plain, rounds)


def test_zero_rounds_is_the_plain_sampler():
    schedule = build_schedule("cosine")
    ts = time_grid(4, "logsnr", schedule)
    noise = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0))

    def denoise(x, t):
        return 0.5 * x

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    a = sample("ancestral", denoise, noise, ts, schedule, generators=gens, resample_rounds=0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert torch.equal(a, sample("ancestral", denoise, noise, ts, schedule, generators=gens))


def test_segment_with_model_returns_masks_on_the_grid(runs):
    base = runs["base_run"]
    ct = volumes(base.grid.shape[0])["ct"]
    masks = segment_with_model(base, ct, steps=2)
    assert set(masks) == {"lobes", "airway", "vessels"}
    assert all(m.shape == base.grid.shape and m.dtype == np.uint8 for m in masks.values())
    with pytest.raises(DataError, match="expected the grid"):
        segment_with_model(base, ct[:2], steps=2)


def test_parse_fix():
    assert parse_fix(["ct=a.nii.gz", "lobes = b.nii"]) == {"ct": Path("a.nii.gz"), "lobes": Path("b.nii")}
