"""Training end to end on tiny models: run directory, resume, non-finite loss, DDP over gloo, W&B previews."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sample import FAST, run_sample
from training_fixtures import make_cache, make_text_model

from medsyn.data.channels import ENCODING
from medsyn.training.config import load_run_config
from medsyn.training.module import NonFiniteLossError
from medsyn.training.run import train
from medsyn.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {"cache": make_cache(base / "cache", n=8, size=32), "bert": make_text_model(base / "bert")}


def overrides(assets, run_dir, stage="base", **extra) -> list[str]:
    args = {
        "run_dir": run_dir,
        "model.preset": f"{stage}-tiny",
        "data.root": assets["cache"],
        "data.num_workers": 0,
        "data.batch_size": 2,
        "effective_batch_size": 2,
        "trainer.max_steps": 3,
        "trainer.accelerator": "cpu",
        "trainer.precision": "32",
        "trainer.val_check_interval": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_model_summary": False,
        "checkpoint.every_n_steps": 2,
        "logger.kind": "csv",
        "preview.every_n_steps": 0,
        "ema.decay": 0.9,
    }
    if stage == "base":
        args["text.model"] = assets["bert"]
    else:
        args["data.crop_size"] = 16
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run(assets, run_dir, stage="base", **extra):
    return train(load_run_config(stage, None, overrides(assets, run_dir, stage, **extra)))


def test_base_run_directory(assets, tmp_path):
    run_dir = run(assets, tmp_path / "run")
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    state, config = load_weights(run_dir / "model.safetensors")
    assert config["stage"] == "base" and config["model"]["preset"] == "base-tiny"
    assert config["global_step"] == 3
    assert any(k.startswith("net.") for k in state) and all(torch.isfinite(v).all() for v in state.values())
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # data, not code
    assert ckpt["global_step"] == 3
    metrics = (run_dir / "logs" / "version_0" / "metrics.csv").read_text()
    for name in ("train/loss", "val/loss", "train/grad_norm", "train/voxels_per_sec"):
        assert name in metrics


def test_sr_run_with_gradient_accumulation(assets, tmp_path):
    run_dir = run(assets, tmp_path / "sr", stage="sr", effective_batch_size=4, **{"trainer.max_steps": 2})
    state, config = load_weights(run_dir / "model.safetensors")
    assert config["stage"] == "sr" and config["model"]["preset"] == "sr-tiny"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert "accumulate_grad_batches: 2" in (run_dir / "logs" / "version_0" / "hparams.yaml").read_text()
    # 3 batches per epoch: two accumulate into step 1, the epoch's last one makes step 2 on its own
    # (the checkpoint is taken at that batch's end: processed, not yet marked completed)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 3


def test_bits_runs_train_export_preview_and_sample_lobe_labels(assets, tmp_path):
    extra = {"lobe_encoding": "bits", "trainer.max_steps": 2, "preview.every_n_steps": 2, "preview.steps": 2,
             "preview.seeds": "[0]"}  # fmt: skip
    base, sr = run(assets, tmp_path / "base", **extra), run(assets, tmp_path / "sr", stage="sr", **extra)
    for run_dir, channels in ((base, (6, 6)), (sr, (12, 6))):  # SR: 6 noisy + 6 concatenated in, 6 out
        state, config = load_weights(run_dir / "model.safetensors")
        assert config["lobe_encoding"] == "bits" and config["encoding"] == ENCODING  # for sample.py
        assert "lobe_encoding: bits" in (run_dir / "config.yaml").read_text()
        assert (state["net.conv_in.weight"].shape[1], state["net.conv_out.weight"].shape[0]) == channels
        assert (run_dir / "previews" / "step_0000002.png").is_file()  # previews see four channels
    out = tmp_path / "samples"
    assert run_sample("--base", base, "--sr", sr, "--prompt", "Normal.", "--out", out, *FAST) == 0
    lobes = nib.load(out / "0" / "lobes.nii.gz")
    assert lobes.shape == (32,) * 3 and lobes.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(lobes.dataobj))) <= set(range(6))


def test_rectified_flow_runs_train_with_the_velocity_target_and_sample_with_heun(assets, tmp_path):
    extra = {"diffusion.schedule": "rectified-flow", "diffusion.parameterization": "flow",
             "loss.time_sampling": "logit-normal", "trainer.max_steps": 2, "preview.every_n_steps": 2,
             "preview.steps": 2, "preview.seeds": "[0]"}  # fmt: skip
    base, sr = run(assets, tmp_path / "base", **extra), run(assets, tmp_path / "sr", stage="sr", **extra)
    for run_dir in (base, sr):
        _, config = load_weights(run_dir / "model.safetensors")
        assert (
            config["diffusion"]["schedule"] == "rectified-flow"
            and config["diffusion"]["parameterization"] == "flow"
        )
        assert (run_dir / "previews" / "step_0000002.png").is_file()  # previews sample on the uniform grid
    out = tmp_path / "samples"
    assert (
        run_sample(
            "--base", base, "--sr", sr, "--prompt", "Normal.", "--out", out, "--sampler", "heun", *FAST
        )
        == 0
    )
    ct = np.asarray(nib.load(out / "0" / "ct.nii.gz").dataobj)
    assert ct.shape == (32,) * 3 and np.isfinite(ct).all()


def _net_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["medsyn_ema"].items()}}


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_resume_reaches_the_same_weights(assets, tmp_path, stage):
    # 6 training subjects / batch 2 = 3 batches per epoch: stopping at step 2 is mid-epoch
    full = run(assets, tmp_path / "full", stage, **{"trainer.max_steps": 5})
    part = run(assets, tmp_path / "part", stage, **{"trainer.max_steps": 2})
    run(assets, part, stage, **{"trainer.max_steps": 5})  # resume=auto continues from last.ckpt
    a = _net_state(full / "checkpoints" / "last.ckpt")
    b = _net_state(part / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ema_a, _ = load_weights(full / "model.safetensors")
    ema_b, _ = load_weights(part / "model.safetensors")
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key


def test_refuses_to_clobber_a_run(assets, tmp_path):
    run(assets, tmp_path / "run", **{"trainer.max_steps": 2})
    with pytest.raises(Exception, match="already holds checkpoints"):
        run(assets, tmp_path / "run", resume="never")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    run_dir = run(assets, tmp_path / "run", **{"trainer.max_steps": 2})
    last = run_dir / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    broken = make_cache(tmp_path / "broken", n=8, size=32)
    for lr in broken.glob("*/lr.npy"):
        arr = __import__("numpy").load(lr)
        arr[0, 0, 0, 0] = float("nan")
        __import__("numpy").save(lr, arr)
    with pytest.raises(NonFiniteLossError, match="not finite at step 2"):
        run(assets, run_dir, **{"trainer.max_steps": 4, "data.root": broken})
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    state = _net_state(last)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_wandb_offline_run_logs_previews(assets, tmp_path):
    pytest.importorskip("wandb")
    run_dir = run(assets, tmp_path / "wb", **{"logger.kind": "wandb", "preview.every_n_steps": 2, "preview.steps": 2,
                                              "preview.seeds": "[0]", "trainer.max_steps": 2})  # fmt: skip
    assert (run_dir / "previews" / "step_0000002.png").is_file()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "W&B should run offline when no API key is set"
    images = list(runs[0].glob("files/media/images/preview_*.png"))
    assert images, "the preview grid should be logged to W&B"


def test_ddp_two_processes_over_gloo(assets, tmp_path):
    run_dir = tmp_path / "ddp"
    args = overrides(assets, run_dir, **{"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 2,
                                         "effective_batch_size": 4})  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "base", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    hparams = (run_dir / "logs" / "version_0" / "hparams.yaml").read_text()
    assert "world_size: 2" in hparams and "accumulate_grad_batches: 1" in hparams
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert load_file(run_dir / "model.safetensors")


def test_phantom_data_takes_its_lr_factor_from_the_config(tmp_path):
    from omegaconf import OmegaConf

    from medsyn.data.cache import read_cache_manifest
    from medsyn.errors import ConfigError
    from medsyn.training.run import ensure_data

    spec = {"n": 2, "size": 16, "seed": 0, "out": str(tmp_path / "phantoms"), "lr_factor": 8}
    cfg = OmegaConf.create({"data": {"root": str(tmp_path / "cache"), "phantoms": spec}})
    rows = read_cache_manifest(ensure_data(cfg))
    assert len(rows) == 2 and {(r["size"], r["lr_size"]) for r in rows} == {("16", "2")}
    bad = OmegaConf.create({"data": {"root": str(tmp_path / "other"), "phantoms": {**spec, "lr_factor": 3}}})
    with pytest.raises(ConfigError, match="lr_factor=3"):
        ensure_data(bad)
