"""Resuming a run: bit-exact wherever it stopped, one latest checkpoint, damaged files, changed settings.

Tiny base runs on a 32^3 cache: 6 training subjects / batch 2 = 3 batches an epoch, so step 3 ends
epoch 0 and steps 2 and 4 fall mid-epoch. The kill -9 trials are in test_kill_resume.py (slow).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from training_fixtures import make_cache, make_text_model

from medsyn.errors import ConfigError, DataError
from medsyn.training.config import load_run_config
from medsyn.training.run import train
from medsyn.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {"cache": make_cache(base / "cache", n=8, size=32), "bert": make_text_model(base / "bert")}


def settings(assets, run_dir, **extra) -> list[str]:
    args = {
        "run_dir": run_dir,
        "model.preset": "base-tiny",
        "text.model": assets["bert"],
        "data.root": assets["cache"],
        "data.num_workers": 0,
        "data.batch_size": 2,
        "effective_batch_size": 2,
        "trainer.max_steps": 4,
        "trainer.accelerator": "cpu",
        "trainer.precision": "32",
        "trainer.val_check_interval": 2,
        "trainer.limit_val_batches": 1,
        "trainer.enable_model_summary": False,
        "checkpoint.every_n_steps": 2,
        "logger.kind": "none",
        "preview.every_n_steps": 0,
        "ema.decay": 0.9,
        "optim.warmup_steps": 10,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run(assets, run_dir, **extra) -> Path:
    return train(load_run_config("base", None, settings(assets, run_dir, **extra)))


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, mmap=True)["global_step"])


def latest_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt"))


def assert_same_weights(a: Path, b: Path) -> None:
    """The raw weights and the EMA in last.ckpt, and the exported model.safetensors, bit for bit."""
    ca = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"]
    for part in ("state_dict", "medsyn_ema"):
        assert ca[part].keys() == cb[part].keys()
        for key in ca[part]:
            assert torch.equal(ca[part][key], cb[part][key]), f"{part}: {key}"
    wa, _ = load_weights(a / "model.safetensors")
    wb, _ = load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def full(assets, tmp_path_factory) -> Path:
    """An uninterrupted run to step 4, started with relative paths from its own directory, umask 022."""
    home = tmp_path_factory.mktemp("full")
    cwd, mask = os.getcwd(), os.umask(0o022)
    try:
        os.chdir(home)
        rel = {k: os.path.relpath(v, home) for k, v in assets.items()}
        run(rel, "runs/full")
    finally:
        os.chdir(cwd)
        os.umask(mask)
    return home / "runs" / "full"


@pytest.fixture(scope="module")
def stops(assets, full, tmp_path_factory) -> dict[int, Path]:
    """One run stopped at 2 (mid-epoch), at 3 (the end of epoch 0) and at 4: a copy after each stop.
    No periodic checkpoints: each stop's own save is the latest (Lightning's save_last once wrote
    last-v1.ckpt beside a stale last.ckpt then)."""
    base = tmp_path_factory.mktemp("stops")
    snapshots = {}
    for stop in (2, 3, 4):
        run(assets, base / "run", **{"trainer.max_steps": stop, "checkpoint.every_n_steps": 100})
        snapshots[stop] = Path(shutil.copytree(base / "run", base / f"after{stop}"))
    return snapshots


def test_each_stop_leaves_one_latest_checkpoint(stops):
    for stop, run_dir in stops.items():
        assert latest_files(run_dir) == ["last.ckpt"], f"after the stop at {stop}"
        assert step_of(run_dir / "checkpoints" / "last.ckpt") == stop


def test_stops_mid_epoch_and_at_epoch_end_resume_exactly(full, stops):
    assert_same_weights(full, stops[4])  # the stop at 3 once skipped epoch 1's data


def test_run_dir_records_absolute_paths_and_usual_modes(full):
    config = (full / "config.yaml").read_text()
    _, weights_config = load_weights(full / "model.safetensors")
    for key, value in (("run_dir", weights_config["run_dir"]), ("root", weights_config["data"]["root"]),
                       ("model", weights_config["text"]["model"])):  # fmt: skip
        assert os.path.isabs(value) and Path(value).exists(), (key, value)
        assert f"{key}: {value}\n" in config
    for path in (full / "model.safetensors", full / "config.yaml", full / "checkpoints" / "last.ckpt"):
        assert (path.stat().st_mode & 0o777) == 0o644, path  # safetensors alone would make 0600


def test_moved_run_dir_with_a_damaged_last_resumes_exactly_and_tidies(assets, full, stops, tmp_path, capsys):
    # moved elsewhere, no periodic checkpoints (Lightning's save_last used to add last-v1.ckpt for both)
    run_dir = Path(shutil.copytree(stops[3], tmp_path / "elsewhere" / "run"))
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 3])  # truncated; the step=0000003.ckpt beside it is intact
    leftovers = [run_dir / ".model.safetensors.x1y2.tmp.safetensors",  # 0 bytes, from a kill mid-export
                 run_dir / "checkpoints" / ".step=0000004.ckpt.a1b2.tmp.ckpt"]  # fmt: skip
    leftovers[0].write_bytes(b"")
    leftovers[1].write_bytes(b"\0" * (2 << 20))
    capsys.readouterr()
    run(assets, run_dir, **{"checkpoint.keep": 1, "checkpoint.every_n_steps": 0})
    lines = [line for line in capsys.readouterr().out.splitlines() if "last.ckpt" in line]
    assert len(lines) == 1 and "truncated" in lines[0] and "step=0000003.ckpt (step 3)" in lines[0], lines
    assert_same_weights(full, run_dir)
    assert not any(p.exists() for p in leftovers)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step=0000004.ckpt"]  # one latest, checkpoint.keep=1 step checkpoint


def test_changed_lr_on_resume_is_used_and_recorded(assets, stops, tmp_path, capsys):
    run_dir = Path(shutil.copytree(stops[2], tmp_path / "run"))
    run(assets, run_dir, **{"trainer.max_steps": 3, "optim.lr": 5.0e-4})
    assert "optim.lr=0.0005 (the checkpoint had 0.0001)" in capsys.readouterr().out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 5.0e-4 and ckpt["lr_schedulers"][0]["base_lrs"] == [5.0e-4]
    assert group["lr"] == pytest.approx(5.0e-4 * 4 / 10)  # the warm-up after 3 steps, of the new lr
    assert "  lr: 0.0005\n" in (run_dir / "config.yaml").read_text()
    assert load_weights(run_dir / "model.safetensors")[1]["optim"]["lr"] == 5.0e-4


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, "seed=1: .* was trained with seed=0"),
        ({"model.num_channels": "[16,16]"}, "holds another model"),
    ],  # fmt: skip
)
def test_refuses_a_resume_that_would_not_use_a_setting(assets, stops, tmp_path, change, match):
    run_dir = Path(shutil.copytree(stops[2], tmp_path / "run"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=match) as err:
        run(assets, run_dir, **change)
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_final_weights_are_exported_when_the_checkpoint_is_already_final(assets, full, stops, tmp_path):
    # a kill after the last checkpoint and before the last export: the next start only exports
    run_dir = Path(shutil.copytree(stops[4], tmp_path / "run"))
    (run_dir / "model.safetensors").unlink()
    run(assets, run_dir)
    assert_same_weights(full, run_dir)
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["global_step"] == 4


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lr=-1", r"optim.lr=-1; expected a number > 0"),
        ("optim.lr=abc", r"optim.lr='abc'; expected a number > 0"),
        ("trainer.max_steps=abc", r"trainer.max_steps='abc'; expected an integer"),
        ("data.num_workers=-1", r"data.num_workers=-1; expected an integer >= 0"),
        ("checkpoint.keep=abc", r"checkpoint.keep='abc'; expected an integer >= 1"),
        ("trainer.precision=17", r"trainer.precision=17: Lightning refuses it: Precision 17 is invalid"),
        ("trainer.devices=0", r"trainer.devices=0: Lightning refuses it"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(assets, tmp_path, override, match):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=match) as err:
        run(assets, tmp_path / "run", **{"logger.kind": "csv", key: value})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_progress_bar_can_be_turned_off(assets, tmp_path):
    run_dir = run(assets, tmp_path / "run", **{"trainer.max_steps": 1, "trainer.enable_progress_bar": False})
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 1  # a MisconfigurationException before


def test_code_planted_in_last_ckpt_is_refused_in_one_line(assets, tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save({"global_step": 2, "hook": os.system}, ckpt_dir / "last.ckpt")
    with pytest.raises(DataError, match=r"last.ckpt: holds objects other than tensors") as err:
        run(assets, tmp_path / "run", **{"logger.kind": "csv"})
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints", "last.ckpt"]


@pytest.mark.slow  # a process start: the in-process tests above check the same errors
def test_command_line_error_is_one_line_exit_2(assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = settings(assets, tmp_path / "run", **{"optim.lr": -1, "logger.kind": "csv"})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "base", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["train.py base: error: the config with the command-line overrides: "
                                                "optim.lr=-1; expected a number > 0, e.g. 1.0e-4"]  # fmt: skip
    assert not (tmp_path / "run").exists()
