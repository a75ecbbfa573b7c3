"""The radiograph VQ-GAN (`medsyn.radiograph.vqgan`) and `train.py vqgan` (`medsyn.training.vqgan`): token
shapes and ranges, config errors, a tiny run with its outputs, exact resume and the `load_vqgan` round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medsyn.errors import ConfigError, DataError
from medsyn.radiograph.cache import read_radiograph_manifest, write_radiograph, write_radiograph_manifest
from medsyn.radiograph.vqgan import build_vqgan, load_vqgan
from medsyn.training.config import load_run_config
from medsyn.training.vqgan import VQGANModule, train_vqgan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """12 radiographs of 32^2 (a bright disc on a dark gradient, placed per subject): 5 train, 4 val, 3 test."""
    root = tmp_path_factory.mktemp("vqgan") / "drr"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 31.0
    for i in range(12):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        image = -0.8 + 0.6 * yy + 1.2 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 0.04)
        meta = {"findings": f"Finding {i}.", "impression": "None.", "kind": "drr"}
        write_radiograph(root, f"s{i:02d}", np.clip(image, -1, 1).astype(np.float32), meta)
    rows = write_radiograph_manifest(root, fractions=(0.7, 0.2, 0.1))
    assert {"train", "test"} <= {r["split"] for r in rows}
    return root


def overrides(cache: Path, run_dir: Path, **extra) -> list[str]:
    settings = {
        "run_dir": str(run_dir),
        "model.preset": "vqgan-tiny",
        "discriminator.channels": 4,
        "discriminator.num_layers_d": 2,
        "loss.adv_start_step": 1,  # the discriminator trains from the second step
        "data.root": str(cache),
        "data.batch_size": 2,
        "data.num_workers": 0,
        "effective_batch_size": 2,
        "optim.warmup_steps": 3,  # a scheduler to restore on resume
        "checkpoint.every_n_steps": 2,
        "logger.kind": "csv",
        "trainer.max_steps": 2,  # of 3 batches an epoch: a resume continues mid-epoch
        "trainer.log_every_n_steps": 1,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.precision": "32",
        "trainer.val_check_interval": 2,
        "trainer.limit_val_batches": 1,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def images(cache: Path, split: str = "test") -> torch.Tensor:
    rows = read_radiograph_manifest(cache, split)
    return torch.stack(
        [torch.from_numpy(np.load(r["image"]).astype(np.float32)) for r in rows]
    )  # (N, 1, 32, 32)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "vqgan"
    return train_vqgan(load_run_config("vqgan", None, overrides(cache, run_dir)))


# ---- the model ---------------------------------------------------------------------------------------
def test_codes_are_a_grid_of_codebook_indices_and_decode_to_images_in_range():
    model = build_vqgan("vqgan-tiny")  # 32^2 -> 8x8 tokens
    assert (model.image_size, model.downsample, model.token_grid) == (32, 4, 8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    codebook = model.net.quantizer.quantizer.embedding.weight.clone()
    codes = model.train().encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < model.num_codes
    assert torch.equal(codebook, model.net.quantizer.quantizer.embedding.weight)  # encode leaves the codebook
    out = model.decode(codes)
    assert out.shape == (2, 1, 32, 32) and float(out.abs().max()) <= 1.0
    assert model.encode(x[:, :, :16, :8]).shape == (2, 4, 2)  # any multiple of the factor: keypatches
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(x[:, :, :30])
    with pytest.raises(ValueError, match="outside"):
        model.decode(torch.full((1, 8, 8), model.num_codes))


def test_unused_codes_restart_at_encodings_and_used_ones_stay():
    model = build_vqgan("vqgan-tiny")
    q = model.net.quantizer.quantizer
    q.ema_cluster_size[:4] = 5.0  # codes 0-3 in use, the others never used
    before = q.embedding.weight.clone()
    z = torch.randn(2, q.embedding_dim, 8, 8)  # (B, E, h, w)
    dead = model.restart_dead_codes(z, threshold=0.1)
    assert dead.tolist() == list(range(4, model.num_codes))
    assert torch.equal(q.embedding.weight[:4], before[:4])
    encodings = z.movedim(1, -1).reshape(-1, q.embedding_dim)
    assert (q.embedding.weight[4:, None] == encodings[None]).all(-1).any(-1).all()  # each one an encoding
    assert torch.allclose(q.ema_cluster_size[4:], torch.full((model.num_codes - 4,), 0.1))
    assert model.restart_dead_codes(z, threshold=0.05).numel() == 0  # all in use now


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.image_size=30", "model.image_size"),  # not divisible by the token grid
        ("model.token_grid=1", "model.channels"),  # 32x downsampling needs 5 levels
        ("model.codes=12", "codes"),
        ("discriminator.bogus=1", "bogus"),
        ("loss.adv_weight=-1", "loss.adv_weight"),
        ("effective_batch_size=16", "effective_batch_size"),
        ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
        ("data.size=64", "data.size"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_the_key(tmp_path, override, key):
    base = ["model.preset=vqgan-tiny", "data.batch_size=2", "effective_batch_size=2"]
    with pytest.raises(ConfigError) as err:
        load_run_config("vqgan", None, [*base, override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_cache_of_another_image_size_is_refused_before_training(cache, tmp_path):
    cfg = load_run_config("vqgan", None, overrides(cache, tmp_path / "run", **{"model.image_size": 64,
                                                                             "model.token_grid": 16}))  # fmt: skip
    with pytest.raises(ConfigError, match="model.image_size=64"):
        train_vqgan(cfg)
    assert not (tmp_path / "run").exists()


# ---- training ----------------------------------------------------------------------------------------
def test_a_run_writes_its_outputs_with_held_out_metrics(run, cache):
    for name in (
        "config.yaml",
        "checkpoints/last.ckpt",
        "model.safetensors",
        "metrics.json",
        "reconstructions.png",
    ):
        assert (run / name).is_file(), name
    assert list((run / "logs").rglob("metrics.csv"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == len(read_radiograph_manifest(cache, "test"))
    assert metrics["global_step"] == 2  # a batch is one step, the discriminator's included
    assert np.isfinite(metrics["psnr"]) and -1.0 <= metrics["ssim"] <= 1.0
    assert 0.0 < metrics["codebook_usage"] <= 1.0 and 1.0 <= metrics["perplexity"] <= metrics["num_codes"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [2]  # the generator's warm-up, stepped by hand
    state = load_file(str(run / "model.safetensors"))
    assert state and not any(k.startswith(("discriminator", "model.")) for k in state)  # the generator only


def test_load_vqgan_gives_the_codes_of_the_trained_module(run, cache):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = VQGANModule(ckpt["hyper_parameters"]["config"])
    module.load_state_dict(ckpt["state_dict"])
    loaded = load_vqgan(run)
    x = images(cache)
    assert not loaded.training and loaded.sha256 and len(loaded.sha256) == 64
    assert torch.equal(loaded.encode(x), module.vqgan.eval().encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), module.vqgan.decode(module.vqgan.encode(x)))


def test_resume_continues_exactly(run, cache, tmp_path):
    straight = train_vqgan(load_run_config("vqgan", None, overrides(cache, tmp_path / "a",
                                                                    **{"trainer.max_steps": 4})))  # fmt: skip
    resumed = tmp_path / "b"
    train_vqgan(load_run_config("vqgan", None, overrides(cache, resumed)))
    train_vqgan(load_run_config("vqgan", None, overrides(cache, resumed, **{"trainer.max_steps": 4})))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 4
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    different = load_file(str(run / "model.safetensors"))  # 2 steps: the weights did move
    assert not all(torch.equal(a[k], different[k]) for k in a)


def test_loading_a_run_without_weights_is_a_clear_error(run, tmp_path):
    with pytest.raises(DataError, match="model.safetensors: no such weights file"):
        load_vqgan(tmp_path)
    with pytest.raises(DataError, match="no such run directory"):
        load_vqgan(tmp_path / "missing")
