"""sample.py end to end on tiny runs: files, dtypes, affines, provenance, seeds, batch invariance, refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from training_fixtures import make_cache, make_text_model

from medsyn.config import to_container
from medsyn.data.nifti import spacing_affine
from medsyn.generation.model import build_diffusion_model
from medsyn.generation.run import load_run
from medsyn.generation.stages import SampleOptions, synthesize
from medsyn.training.config import load_run_config
from medsyn.weights import export_weights, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # hr grid 16^3 at 16 mm, base grid 4^3 at 64 mm


def make_runs(root: Path, size: int = SIZE) -> dict[str, Path]:
    """Base and SR run directories with tiny, randomly perturbed (so not all-zero) weights."""
    cache = make_cache(root / "cache", n=4, size=size)
    bert = make_text_model(root / "bert")
    runs = {"cache": cache, "bert": bert}
    for stage in ("base", "sr"):
        over = [f"run_dir={root / stage}", f"model.preset={stage}-tiny", f"data.root={cache}"]
        over += [f"text.model={bert}"] if stage == "base" else []
        cfg = to_container(load_run_config(stage, None, over))
        model = build_diffusion_model(cfg)
        gen = torch.Generator().manual_seed(1 if stage == "base" else 2)
        with torch.no_grad():
            for p in model.denoiser.net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        export_weights(root / stage / "model.safetensors", model.exported_state(), {**cfg, "global_step": 0})
        runs[stage] = root / stage
    return runs


def load_sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_sample(*argv: str) -> int:
    """Run sample.py in-process, as its __main__ does (user errors -> exit code 2)."""
    from medsyn.cli import run_cli

    script = load_sample_script()
    return run_cli(script.main, "sample.py", script.build_parser().parse_args([str(a) for a in argv]))


FAST = ("--steps", "2", "--sr-steps", "2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 3-D convolutions run many times faster on one thread than on two busy cores; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return make_runs(tmp_path_factory.mktemp("runs"))


def test_files_dtypes_affines_and_provenance(runs, tmp_path):
    out = tmp_path / "out"
    rc = run_sample("--base", runs["base"], "--sr", runs["sr"], "--prompt", "Right effusion.", "--prompt", "Normal.",
                    "--out", out, "--seed", "7", *FAST)  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    affine = spacing_affine(256.0 / SIZE, (SIZE,) * 3)
    for index, (prompt, seed) in enumerate([("Right effusion.", 7), ("Normal.", 8)]):
        d = out / str(index)
        names = {"ct.nii.gz", "lobes.nii.gz", "airway.nii.gz", "vessels.nii.gz", "preview.png", "meta.json"}
        assert {p.name for p in d.iterdir()} == names
        for name, dtype in [
            ("ct", np.int16),
            ("lobes", np.uint8),
            ("airway", np.uint8),
            ("vessels", np.uint8),
        ]:
            image = nib.load(d / f"{name}.nii.gz")
            array = np.asarray(image.dataobj)
            assert array.shape == (SIZE,) * 3 and array.dtype == dtype
            np.testing.assert_allclose(image.affine, affine)
        assert np.asarray(nib.load(d / "lobes.nii.gz").dataobj).max() <= 5
        assert set(np.unique(np.asarray(nib.load(d / "airway.nii.gz").dataobj))) <= {0, 1}
        ct = np.asarray(nib.load(d / "ct.nii.gz").dataobj)
        assert -1024 <= ct.min() and ct.max() <= 600
        meta = json.loads((d / "meta.json").read_text())
        assert (meta["prompt"], meta["seed"], meta["sampler"], meta["steps"]) == (prompt, seed, "dpmpp-2m", 2)
        assert meta["weights"]["base"]["sha256"] == sha256_file(runs["base"] / "model.safetensors")
        assert meta["weights"]["sr"]["sha256"] == sha256_file(runs["sr"] / "model.safetensors")
        assert meta["grid"]["shape"] == [SIZE] * 3 and meta["grid"]["stage"] == "sr"
        np.testing.assert_allclose(meta["grid"]["affine"], affine)
        assert {"torch", "medsyn", "monai"} <= set(meta["versions"])
        assert meta["guidance"] == 3.0 and meta["fixed"] == {}


def test_base_only_is_written_on_the_low_resolution_grid(runs, tmp_path):
    assert run_sample("--base", runs["base"], "--prompt", "Normal.", "--out", tmp_path / "o", *FAST) == 0
    image = nib.load(tmp_path / "o" / "0" / "ct.nii.gz")
    lr = SIZE // 4
    assert image.shape == (lr,) * 3
    expected = spacing_affine(256.0 / SIZE, (SIZE,) * 3)
    expected[:3, :3] *= 4  # every 4th voxel of the hr grid, voxel 0 shared (the cache's lr stack)
    np.testing.assert_allclose(image.affine, expected)


def test_same_seed_same_volume_and_batch_size_invariance(runs):
    base, sr = load_run(runs["base"], stage="base"), load_run(runs["sr"], stage="sr")
    prompts, seeds = ["Right effusion.", "Normal lungs.", "Emphysema."], [3, 4, 5]
    batched = synthesize(base, sr, prompts, seeds, SampleOptions(steps=2, sr_steps=2, batch_size=3))
    again = synthesize(base, sr, prompts, seeds, SampleOptions(steps=2, sr_steps=2, batch_size=3))
    assert torch.equal(batched, again)
    for i in range(3):
        alone = synthesize(base, sr, prompts[i : i + 1], seeds[i : i + 1], SampleOptions(steps=2, sr_steps=2))
        torch.testing.assert_close(alone[0], batched[i], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)  # different seeds differ


def test_existing_out_dir_refused_without_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_sample("--base", runs["base"], "--prompt", "x", "--out", out, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left
    assert run_sample("--base", runs["base"], "--prompt", "x", "--out", out, "--overwrite", *FAST) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0"]


def test_prompts_file_text_and_jsonl(tmp_path):
    script = load_sample_script()
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "seed": 40}\n{"prompt": "b"}\n')
    assert script.read_prompts(tmp_path / "p.txt") == [("first", None), ("second", None)]
    prompts = script.read_prompts(tmp_path / "p.jsonl")
    assert script.requests(prompts, 2, 10) == [("a", 40), ("a", 41), ("b", 12), ("b", 13)]
    (tmp_path / "bad.jsonl").write_text('{"seed": 1}\n')
    from medsyn.errors import DataError

    with pytest.raises(DataError, match="bad.jsonl:1"):
        script.read_prompts(tmp_path / "bad.jsonl")


def test_cli_errors_are_one_line_without_traceback(runs, tmp_path):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--base", str(tmp_path / "nope"), "--prompt", "x",
           "--out", str(tmp_path / "o")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "nope" in result.stderr and not (tmp_path / "o").exists()


def test_wrong_stage_run_is_named(runs, tmp_path, capsys):
    assert run_sample("--base", runs["sr"], "--prompt", "x", "--out", tmp_path / "o", *FAST) == 2
    assert "is a 'sr' run, expected a 'base' run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_guidance_options_reach_the_sample(runs, tmp_path):
    common = ("--base", runs["base"], "--prompt", "Effusion.", *FAST)
    assert run_sample(*common, "--out", tmp_path / "a") == 0
    assert run_sample(*common, "--out", tmp_path / "b", "--guidance-interval", "0.2", "0.8",
                      "--guidance-rescale", "0.5") == 0  # fmt: skip
    meta = json.loads((tmp_path / "b" / "0" / "meta.json").read_text())
    assert meta["options"]["guidance_interval"] == [0.2, 0.8] and meta["options"]["guidance_rescale"] == 0.5
    a, b = (nib.load(tmp_path / d / "0" / "ct.nii.gz").get_fdata() for d in "ab")
    assert not np.array_equal(a, b)


def test_sr_noise_outside_the_trained_range_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "o"
    common = ("--base", runs["base"], "--prompt", "x", "--out", out, *FAST)
    assert run_sample(*common, "--sr", runs["sr"], "--sr-noise", "0.5") == 2
    err = capsys.readouterr().err.strip()
    assert "--sr-noise=0.5" in err and "[0, 0.2]" in err and len(err.splitlines()) == 1
    assert run_sample(*common, "--sr-noise", "0.1") == 2
    assert "needs --sr" in capsys.readouterr().err
    assert (
        run_sample(*common, "--sr", runs["sr"], "--sr-noise", "0.1", "--guidance-interval", "0.9", "0.1") == 2
    )
    assert "guidance interval" in capsys.readouterr().err and not out.exists()
