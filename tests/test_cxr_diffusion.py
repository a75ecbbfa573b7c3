"""The 2-D diffusion baseline (`train.py cxr-diffusion`, `medsyn.generation.diffusion2d`) on tiny radiographs:
the run directory, area downsampling, seeded sampling independent of the batch, and CT models unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import REPORTS, make_text_model

from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.generation.diffusion2d import load_cxr_diffusion, sample_images
from medsyn.generation.model import build_diffusion_model
from medsyn.radiograph.cache import write_radiograph, write_radiograph_manifest
from medsyn.training.config import load_run_config
from medsyn.training.cxr_diffusion import RadiographImages, train_cxr_diffusion
from medsyn.weights import export_weights, load_weights, sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 32  # cached images; the runs learn them area-downsampled to 16^2


def make_radiographs(root: Path, n: int = 8, size: int = SIZE) -> Path:
    """A radiograph cache of `n` toy chests: a bright body, two dark lungs, noise."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij")
    for i in range(n):
        image = np.where((x / 0.9) ** 2 + (y / 0.95) ** 2 < 1, 0.4, -1.0)
        for side in (-1, 1):
            image[((x - 0.4 * side) / 0.3) ** 2 + (y / 0.6) ** 2 < 1] = -0.6
        image = np.clip(image + rng.normal(0, 0.05, image.shape), -1, 1)
        findings, impression = REPORTS[i % len(REPORTS)]
        meta = {"findings": findings, "impression": impression, "kind": "drr", "source": "synthetic"}
        write_radiograph(root, f"toy_{i:03d}", image.astype(np.float32), meta)
    write_radiograph_manifest(root, fractions=(0.75, 0.25, 0.0))  # toy_000 lands in val
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("cxr")
    return {"cache": make_radiographs(base / "cache"), "bert": make_text_model(base / "bert")}


def config(assets, run_dir: Path, **extra):
    args = {
        "run_dir": run_dir, "model.preset": "cxr-tiny", "text.model": assets["bert"], "text.max_length": 64,
        "data.root": assets["cache"], "data.size": 16, "data.num_workers": 0, "data.batch_size": 2,
        "effective_batch_size": 2, "trainer.max_steps": 2, "trainer.accelerator": "cpu", "trainer.precision": "32",
        "trainer.val_check_interval": 2, "trainer.log_every_n_steps": 1, "trainer.enable_model_summary": False,
        "trainer.enable_progress_bar": False, "checkpoint.every_n_steps": 2, "logger.kind": "csv", "ema.decay": 0.9,
    }  # fmt: skip
    args.update(extra)
    return load_run_config("cxr-diffusion", None, [f"{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """A cxr-diffusion run directory with randomly perturbed weights (a fresh UNet outputs zeros)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = {**to_container(config(assets, run_dir)), "global_step": 0}
    model = build_diffusion_model(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.denoiser.net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    export_weights(run_dir / "model.safetensors", model.exported_state(), cfg)
    return run_dir


def test_training_writes_the_run_directory(assets, tmp_path):
    run_dir = train_cxr_diffusion(config(assets, tmp_path / "run"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    state, cfg = load_weights(run_dir / "model.safetensors")
    assert cfg["stage"] == "cxr-diffusion" and cfg["global_step"] == 2 and cfg["data"]["size"] == 16
    assert state["net.conv_in.weight"].shape == (16, 1, 3, 3)  # a 1-channel 2-D UNet
    assert state["net.conv_out.weight"].shape == (1, 16, 3, 3)
    metrics = (run_dir / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    images, _ = sample_images(run_dir, ["Normal."], [0], steps=1)
    assert images.shape == (1, 1, 16, 16)


def test_max_time_stops_a_run_and_exports_it(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", **{"trainer.max_steps": -1, "trainer.max_time": "00:00:00:02",
                                              "checkpoint.every_n_steps": 0})  # fmt: skip
    run_dir = train_cxr_diffusion(cfg)
    _, saved = load_weights(run_dir / "model.safetensors")
    assert saved["global_step"] > 0 and saved["trainer"]["max_time"] == "00:00:00:02"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_images_are_area_downsampled_to_data_size(assets):
    full = RadiographImages(assets["cache"], size=None)
    small = RadiographImages(assets["cache"], size=16)
    full.setup()
    small.setup()
    x, y = full.datasets["train"][0]["x"], small.datasets["train"][0]["x"]
    assert x.shape == (1, SIZE, SIZE) and y.shape == (1, 16, 16)
    torch.testing.assert_close(y, x.reshape(1, 16, 2, 16, 2).mean(dim=(2, 4)))


def test_settings_a_radiograph_run_cannot_use_are_refused(assets, tmp_path):
    for extra, word in (
        ({"data.size": 64}, "data.size=64"),
        ({"model.preset": "base-tiny"}, "spatial_dims"),
        ({"preview.every_n_steps": 5}, "preview"),
    ):
        with pytest.raises(ConfigError, match=word):
            train_cxr_diffusion(config(assets, tmp_path / "run", **extra))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(DataError, match="medsyn drr"):
        train_cxr_diffusion(config(assets, tmp_path / "run", **{"data.root": tmp_path / "none"}))


def test_sample_images_shape_range_and_provenance(run):
    prompts = ["Large right pleural effusion. The heart is enlarged.", "No pleural effusion."]
    images, provenance = sample_images(run, prompts, [0, 1], steps=2)
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32
    assert bool(torch.isfinite(images).all()) and images.min() >= -1 and images.max() <= 1
    assert not torch.equal(images[0], images[1])
    assert provenance["sha256"] == sha256_file(run / "model.safetensors")
    assert (provenance["sampler"], provenance["steps"], provenance["guidance"]) == ("dpmpp-2m", 2, 3.0)
    unguided, provenance = sample_images(run, prompts, [0, 1], steps=2, guidance=1.0)
    assert provenance["guidance"] == 1.0 and not torch.allclose(images, unguided)


def test_same_seed_same_image_alone_or_in_a_batch(run):
    prompts = ["Right effusion.", "Normal lungs with a much longer report than the first one.", "Emphysema."]
    together, _ = sample_images(run, prompts, [5, 6, 7], steps=2, batch_size=3)
    for i, (prompt, seed) in enumerate(zip(prompts, [5, 6, 7], strict=True)):
        alone, _ = sample_images(run, [prompt], [seed], steps=2, batch_size=1)
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)
    again, _ = sample_images(run, prompts[:1], [6], steps=2)
    assert not torch.allclose(again[0], together[0])  # another seed, another image


def test_load_refuses_another_stage(run, tmp_path):
    _, cfg = load_weights(run / "model.safetensors")
    (tmp_path / "base").mkdir()
    export_weights(tmp_path / "base" / "model.safetensors", {}, {**cfg, "stage": "base"})
    with pytest.raises(DataError, match="expected a cxr-diffusion run"):
        load_cxr_diffusion(tmp_path / "base")
    with pytest.raises(ConfigError, match="one seed per prompt"):
        sample_images(run, ["a", "b"], [0])


@pytest.mark.parametrize(
    ("stage", "extra", "params", "channels"),
    [("base", [], 433972, 4), ("base", ["lobe_encoding=bits"], 435702, 6), ("sr", [], 434644, 8)],
)
def test_ct_configs_build_the_same_models_as_before(assets, stage, extra, params, channels):
    """Parameter counts recorded with the code before the radiograph stage existed."""
    over = [f"model.preset={stage}-tiny", *extra] + (
        [f"text.model={assets['bert']}"] if stage == "base" else []
    )
    model = build_diffusion_model(to_container(load_run_config(stage, None, over)))
    net = model.denoiser.net
    assert sum(p.numel() for p in net.parameters()) == params
    assert net.spatial_dims == 3 and net.in_channels == channels
    assert model.channels == ("ct", "lobes", "airway", "vessels")
    x = torch.zeros(1, 4, 8, 8, 8)
    assert model.to_net(x).shape[1] == net.out_channels and model.from_net(model.to_net(x)).shape[1] == 4
