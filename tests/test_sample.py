"""sample.py end to end on tiny runs: files, dtypes, affines, provenance, seeds, batch invariance, refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil
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


def make_runs(root: Path, size: int = SIZE, lobe_encoding: str = "levels") -> dict[str, Path]:
    """Base and SR run directories with tiny, randomly perturbed (so not all-zero) weights."""
    cache = make_cache(root / "cache", n=4, size=size)
    bert = make_text_model(root / "bert")
    runs = {"cache": cache, "bert": bert}
    for stage in ("base", "sr"):
        over = [f"run_dir={root / stage}", f"model.preset={stage}-tiny", f"data.root={cache}"]
        over += [f"lobe_encoding={lobe_encoding}"]
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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def test_existing_out_dir_refused_without_overwrite_and_kept_with_it(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_sample("--base", runs["base"], "--prompt", "x", "--out", out, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(out) in err and "keep.txt" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left
    assert run_sample("--base", runs["base"], "--prompt", "x", "--out", out, "--overwrite", *FAST) == 0
    # --overwrite never deletes a user's file
    assert sorted(p.name for p in out.iterdir()) == ["0", "keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_refuses_cwd_parent_home_symlink_and_file(runs, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    work = home / "work"
    (work / "project").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "project" / "main.py").write_text("print(1)")
    (work / "file.txt").write_text("mine")
    (work / "link").symlink_to(work / "project")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out in (".", "..", str(home), "link", "file.txt"):
        rc = run_sample("--base", runs["base"], "--prompt", "x", "--out", out, "--overwrite", *FAST)
        assert rc == 2, out
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and out in err and "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["file.txt", "link", "notes.txt", "project"]
    assert (work / "notes.txt").read_text() == "mine" and (work / "project" / "main.py").is_file()
    assert sorted(p.name for p in home.iterdir()) == ["work"]


def interrupt_after(calls: int, monkeypatch) -> list:
    """Make `run_sampling`'s synthesize raise KeyboardInterrupt (Ctrl-C) on call number `calls` + 1."""
    from medsyn.generation import output, stages

    seen: list = []
    real = stages.synthesize

    def synthesize(*args, **kwargs):
        seen.append(args[2])
        if len(seen) > calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(output, "synthesize", synthesize)
    return seen


def test_interrupted_run_keeps_finished_samples_and_a_rerun_continues(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ("--base", runs["base"], "--prompt", "a", "--prompt", "b", "--prompt", "c", "--out", out, *FAST)
    interrupt_after(1, monkeypatch)
    assert run_sample(*args) == 130  # Ctrl-C while sample 1 is made
    assert sorted(p.name for p in out.iterdir()) == ["0"]  # sample 0 finished, nothing half-written
    assert len(list((out / "0").iterdir())) == 6
    first = (out / "0" / "meta.json").read_text()
    assert "run the same command again" in capsys.readouterr().out
    # a killed run (no chance to clean up) leaves its temporary folder: the next run removes it
    stale = out / ".sample-1.k3j5h7g9.tmp"
    stale.mkdir()
    (stale / ".medsyn-unfinished").touch()
    (stale / "ct.nii.gz").write_bytes(b"partial")
    seen = interrupt_after(10, monkeypatch)
    assert run_sample(*args, "--batch-size", "2") == 0  # same request: the batch size does not matter
    assert seen == [["b", "c"]]  # sample 0 is kept, not made again
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2"]
    assert (out / "0" / "meta.json").read_text() == first
    assert [json.loads((out / i / "meta.json").read_text())["prompt"] for i in "012"] == ["a", "b", "c"]
    assert "1 of 3 sample(s) already made" in capsys.readouterr().out


def test_another_request_is_refused_and_overwrite_replaces_only_medsyn_samples(runs, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("--base", runs["base"], "--out", out, *FAST)
    assert run_sample(*common, "--prompt", "a", "--prompt", "b") == 0
    capsys.readouterr()
    assert run_sample(*common, "--prompt", "other") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt" in err and "--overwrite" in err and str(out / "0") in err
    assert json.loads((out / "0" / "meta.json").read_text())["prompt"] == "a"
    (out / "notes.txt").write_text("mine")
    assert run_sample(*common, "--prompt", "other", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["0", "notes.txt"]  # sample 1 was another request's
    assert json.loads((out / "0" / "meta.json").read_text())["prompt"] == "other"
    assert (out / "notes.txt").read_text() == "mine"


def test_progress_bars_over_samples_and_steps(runs, tmp_path, capsys):
    from medsyn.generation.output import run_sampling

    base, sr = load_run(runs["base"], stage="base"), load_run(runs["sr"], stage="sr")
    options = SampleOptions(steps=2, sr_steps=3)
    calls = []
    synthesize(base, sr, ["x"], [0], options, callback=lambda i, t, x, x0: calls.append(i))
    assert calls == [0, 1, 0, 1, 2]  # every step of both stages
    run_sampling(base, sr, [("x", 0), ("y", 1)], options, tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert "samples: 100%" in err and "2/2" in err and "steps" in err and "5/5" in err


def test_negative_guidance_and_empty_prompts_are_refused(runs, tmp_path, capsys):
    common = ("--base", runs["base"], "--out", tmp_path / "o", *FAST)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": " "}\n')
    for extra, expected in [
        (("--prompt", "x", "--guidance", "-1"), "--guidance -1"),
        (("--prompt", "  "), "--prompt '  '"),
        (("--prompts-file", tmp_path / "p.jsonl"), "p.jsonl:2"),
    ]:
        assert run_sample(*common, *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "o").exists()


def test_stored_trust_remote_code_is_ignored_unless_asked(runs, tmp_path, monkeypatch, capsys):
    """A weights file naming a text model with its own code must not make sample.py run that code."""
    import transformers.dynamic_module_utils as dynamic

    from medsyn.weights import load_weights

    marker = tmp_path / "MARKER"
    text = tmp_path / "marker_bert"
    shutil.copytree(runs["bert"], text)
    (text / "marker_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from transformers import BertConfig, BertModel\n"
        "class MarkerConfig(BertConfig):\n    model_type = 'bert'\n"
        "class MarkerModel(BertModel):\n    config_class = MarkerConfig\n"
    )
    config = json.loads((text / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "marker_model.MarkerConfig", "AutoModel": "marker_model.MarkerModel"}
    (text / "config.json").write_text(json.dumps(config))
    state, run_config = load_weights(runs["base"] / "model.safetensors")
    run_config["text"] = {**run_config["text"], "model": str(text), "trust_remote_code": True}
    export_weights(tmp_path / "base" / "model.safetensors", state, run_config)
    # transformers copies remote code to its modules cache and imports it from there: keep that in tmp
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert run_sample("--base", tmp_path / "base", "--prompt", "x", "--out", tmp_path / "o", *FAST) == 0
        assert not marker.exists()
        assert "ignoring text.trust_remote_code" in capsys.readouterr().out
        load_run(tmp_path / "base", trust_remote_code=True, log=lambda _: None)  # the flag: the code runs
        assert marker.exists()
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]


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


def test_a_run_of_the_earlier_lobe_encoding_is_refused_before_sampling(runs, tmp_path, capsys):
    from medsyn.weights import load_weights

    state, run_config = load_weights(runs["base"] / "model.safetensors")
    del run_config["encoding"], run_config["lobe_encoding"]  # as medsyn-1 wrote it
    export_weights(tmp_path / "old" / "model.safetensors", state, run_config)
    assert run_sample("--base", tmp_path / "old", "--prompt", "x", "--out", tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "retrain" in err
    assert "trained with the medsyn-1 lobe encoding" in err
    assert str(tmp_path / "old" / "model.safetensors") in err and not (tmp_path / "o").exists()


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


def test_a_second_run_into_the_same_out_dir_is_refused(runs, tmp_path, capsys):
    from medsyn.io import locked_dir

    out = tmp_path / "out"
    out.mkdir()
    with locked_dir(out):  # as a run still writing samples there holds it
        assert run_sample("--base", runs["base"], "--prompt", "x", "--out", out, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another run is writing" in err and not any(out.iterdir())
