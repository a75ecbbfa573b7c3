"""The generation pipeline: seeded stages, classifier-free guidance, sliding-window SR against full-volume SR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sample import make_runs

from medsyn.conditioning import LowResConditioner
from medsyn.data.grid import upsample
from medsyn.diffusion import Denoiser, build_schedule
from medsyn.generation.model import DiffusionModel
from medsyn.generation.run import load_run, run_grid
from medsyn.generation.stages import SampleOptions, generate_base, generate_sr
from medsyn.generation.windowed import unet_multiple, window_size

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = make_runs(tmp_path_factory.mktemp("runs"))
    return {**out, "base": load_run(out["base"], stage="base"), "sr": load_run(out["sr"], stage="sr")}


@pytest.fixture(scope="module")
def lowres(runs):
    base = runs["base"]
    x = generate_base(base.model, ["Normal.", "Effusion."], [0, 1], base.grid.shape, steps=2)
    return torch.stack([upsample(v, base.factor) for v in x])  # (2, 4, 16, 16, 16)


def test_base_is_seeded_and_guided(runs):
    base = runs["base"]
    args = (base.model, ["Right effusion."], [3], base.grid.shape)
    a, b = generate_base(*args, steps=3), generate_base(*args, steps=3)
    assert a.shape == (1, 4, *base.grid.shape) and torch.equal(a, b)
    assert not torch.allclose(a, generate_base(*args, steps=3, guidance=1.0))


def test_window_covering_the_volume_equals_full_volume_sr(runs, lowres):
    sr = runs["sr"]
    full = generate_sr(sr.model, lowres, [0, 1], steps=3, lowres_noise=0.05)
    windowed = generate_sr(sr.model, lowres, [0, 1], steps=3, lowres_noise=0.05, window=16)
    bigger = generate_sr(sr.model, lowres, [0, 1], steps=3, lowres_noise=0.05, window=64)
    assert torch.equal(full, windowed) and torch.equal(full, bigger)  # clipped to the volume


class LocalNet(torch.nn.Module):
    """A convolution-only SR stand-in (receptive field 3): windows see what the full volume sees except
    at their edges, which the Gaussian blending weighs down."""

    out_channels, downsample_factors = 4, []

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(8, 4, 3, padding=1)

    def forward(self, x, t, concat=None, aug_t=None):
        return torch.tanh(self.conv(torch.cat([x, concat], dim=1)))


def test_overlapping_windows_are_close_to_full_volume_sr(lowres):
    model = DiffusionModel(Denoiser(LocalNet(), build_schedule("cosine")), {"lowres": LowResConditioner()})
    full = generate_sr(model, lowres, [0, 1], steps=3)
    windowed = generate_sr(model, lowres, [0, 1], steps=3, window=8, overlap=0.5)
    assert windowed.shape == full.shape and not torch.equal(windowed, full)
    diff = (windowed - full).abs()
    # only window edges (one voxel) see zero padding, and the Gaussian weights make them count little
    assert diff.mean() < 0.005 * full.std() and diff.max() < 0.05 * full.std(), (diff.mean(), diff.max())


def test_windows_are_per_sample(runs, lowres):
    sr = runs["sr"]
    both = generate_sr(sr.model, lowres, [0, 1], steps=2, lowres_noise=0.05, window=8, overlap=0.25)
    alone = generate_sr(sr.model, lowres[1:], [1], steps=2, lowres_noise=0.05, window=8, overlap=0.25)
    torch.testing.assert_close(alone[0], both[1], atol=1e-4, rtol=1e-4)


def test_window_size_checks():
    assert window_size(144, (256, 256, 256), 16) == (144, 144, 144)
    assert window_size(300, (64, 64, 64), 16) == (64, 64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        window_size(100, (256, 256, 256), 16)


def test_unet_multiple_of_presets():
    import medsyn

    assert unet_multiple(medsyn.build_model("sr-light", device="meta")) == 16
    assert unet_multiple(medsyn.build_model("sr-tiny", device="meta")) == 2


def test_run_grid_sources(runs, tmp_path):
    hr, factor = run_grid(runs["sr"].config)
    assert hr.shape == (16, 16, 16) and hr.spacing == (16.0,) * 3 and factor == 4 and "cache" in hr.source
    config = {
        "data": {"root": str(tmp_path / "gone"), "phantoms": {"size": 64}, "resolution": "lr"},
        "model": {},
    }
    hr, factor = run_grid(config)
    assert hr.shape == (64,) * 3 and hr.spacing == (4.0,) * 3 and hr.source == "data.phantoms" and factor == 4
    config["data"]["phantoms"]["lr_factor"] = 8  # a 16 mm base grid under a 2 mm one, as the demo's
    assert run_grid(config)[1] == 8
    hr, _ = run_grid({"model": {"preset": "base-700m"}, "data": {"resolution": "lr"}})
    assert hr.shape == (256,) * 3 and hr.spacing == (1.0,) * 3
    lr = hr.coarsen(4)
    assert lr.shape == (64,) * 3 and lr.spacing == (4.0,) * 3 and (lr.affine[:3, 3] == hr.affine[:3, 3]).all()


def test_options_are_checked():
    from medsyn.errors import ConfigError

    with pytest.raises(ConfigError, match="sampler"):
        SampleOptions(sampler="lms")
    with pytest.raises(ConfigError, match="sr mode"):
        SampleOptions(sr_mode="tiles")
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        SampleOptions(precision="fp16")


def test_bf16_sampling_runs_the_networks_in_bf16_and_stays_close_to_float32(runs):
    from medsyn.generation.stages import synthesize

    base, sr = runs["base"], runs["sr"]
    seen = []
    hook = base.model.denoiser.net.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        full = synthesize(base, sr, ["Effusion."], [4], SampleOptions(steps=2, sr_steps=2))
        assert set(seen) == {torch.float32}
        seen.clear()
        half = synthesize(base, sr, ["Effusion."], [4], SampleOptions(steps=2, sr_steps=2, precision="bf16"))
        assert set(seen) == {torch.bfloat16}
    finally:
        hook.remove()
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full)
    assert (half - full).abs().mean() < 0.05  # bf16 keeps ~3 significant digits per network call


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    spec = importlib.util.spec_from_file_location("sampling_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_sample_costs_at_most_0_3_pflop():
    bench = load_benchmark()
    assert bench.n_windows(256, 144, 0.2) == 2 and bench.n_windows(256, 144, 0.25) == 3
    assert bench.n_windows(64, 144, 0.2) == 1
    flops = bench.sample_flops(25, 10, 3.0)
    assert flops["base"] == 50 * flops["base_forward"] and flops["sr"] == 10 * flops["sr_forward"]
    assert flops["total"] / 1e15 <= 0.3
    assert bench.sample_flops(25, 10, 3.0, window=144)["total"] / 1e15 <= 0.3


def test_sampling_benchmark_on_tiny_trained_runs(tmp_path):
    from training_fixtures import make_cache, make_text_model

    from medsyn.training.config import load_run_config
    from medsyn.training.run import train

    cache, bert = make_cache(tmp_path / "cache", n=6, size=16), make_text_model(tmp_path / "bert")
    runs = {}
    for stage in ("base", "sr"):
        over = {"run_dir": tmp_path / stage, "model.preset": f"{stage}-tiny", "data.root": cache,
                "data.num_workers": 0, "data.batch_size": 2, "effective_batch_size": 2, "trainer.max_steps": 3,
                "trainer.accelerator": "cpu", "trainer.precision": "32", "trainer.val_check_interval": 3,
                "trainer.enable_model_summary": False, "logger.kind": "none", "preview.every_n_steps": 0,
                "ema.decay": 0.9, **({"text.model": bert} if stage == "base" else {"data.crop_size": 8})}  # fmt: skip
        runs[stage] = train(load_run_config(stage, None, [f"{k}={v}" for k, v in over.items()]))
    bench = load_benchmark()
    out = tmp_path / "sweep"
    report = bench.main(["sweep", "--base", f"tiny={runs['base']}", "--cache", str(cache), "--split", "train",
                         "--samplers", "dpmpp-2m", "heun", "--steps", "2", "--reference", "4", "--num-samples", "3",
                         "--batch-size", "3", "--pairs", "cardiomegaly", "--pair-n", "2", "--precision", "32",
                         "--sr", str(runs["sr"]), "--sr-cache", str(cache), "--sr-steps", "1", "--sr-reference", "2",
                         "--sr-samples", "2", "--out", str(out)])  # fmt: skip
    rows = report["runs"]["tiny"]["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("dpmpp-2m", 4, 4),
        ("dpmpp-2m", 2, 2),
        ("heun", 2, 3),
    ]
    assert report["measures"] and all(
        np.isfinite(d["w"]) and d["se"] >= 0 for r in rows for d in r["distances"].values()
    )
    assert "controllability" in rows[0] and [r["steps"] for r in report["sr"]["rows"]] == [2, 1]
    assert report["cost"]["default_pflop"] <= 0.3 and (out / "sweep.json").is_file()
    common = ["--base", str(runs["base"]), "--sr", str(runs["sr"]), "--cache", str(cache)]
    seg = bench.main(["segment", *common, "--num-subjects", "1", "--steps", "2"])
    assert 0.0 <= seg["lobes"] <= 1.0 and 0.0 <= seg["airway"] <= 1.0


def test_sr_stage_upsamples_as_the_sr_run_was_trained(runs, tmp_path):
    """Bug: the cascade always upsampled the base output with nearest, whatever the SR run trained with."""
    from medsyn.generation.stages import SR_SEED_OFFSET, synthesize
    from medsyn.weights import export_weights, load_weights

    state, config = load_weights(runs["sr"].weights)
    (tmp_path / "sr_tri").mkdir()
    tri_config = {**config, "lowres": {**config["lowres"], "upsample": "trilinear"}}
    export_weights(tmp_path / "sr_tri" / "model.safetensors", state, tri_config)
    base, sr = runs["base"], load_run(tmp_path / "sr_tri", stage="sr")
    opts = SampleOptions(steps=2, sr_steps=2)
    out = synthesize(base, sr, ["Effusion."], [4], opts)
    x = generate_base(base.model, ["Effusion."], [4], base.grid.shape, steps=2)
    expected = generate_sr(sr.model, upsample(x[0], 4, "trilinear")[None], [4 + SR_SEED_OFFSET], steps=2)
    torch.testing.assert_close(out, expected.float())
    nearest = generate_sr(sr.model, upsample(x[0], 4, "nearest")[None], [4 + SR_SEED_OFFSET], steps=2)
    assert not torch.allclose(out, nearest.float(), atol=1e-3)


def test_sr_noise_level_is_checked_against_training(runs):
    from medsyn.errors import ConfigError

    lowres = torch.zeros(1, 4, *runs["sr"].grid.shape)
    with pytest.raises(ConfigError, match=r"low-resolution noise levels in \[0, 0.2\]"):
        generate_sr(runs["sr"].model, lowres, [0], lowres_noise=0.5, steps=1)
    a = generate_sr(runs["sr"].model, lowres, [0], lowres_noise=0.2, steps=1)
    b = generate_sr(runs["sr"].model, lowres, [0], steps=1)  # the run's own level, 0.05
    assert not torch.equal(a, b)


def test_guidance_interval_and_rescale_change_the_sample(runs):
    base = runs["base"]
    args = (base.model, ["Right effusion."], [3], base.grid.shape)
    plain = generate_base(*args, steps=3)
    assert not torch.equal(plain, generate_base(*args, steps=3, guidance_rescale=0.7))
    late = generate_base(*args, steps=3, guidance_interval=(0.0, 0.5))
    assert not torch.equal(plain, late)
    # guiding nowhere is the unguided model
    torch.testing.assert_close(
        generate_base(*args, steps=3, guidance_interval=(0.0, 0.0)),
        generate_base(*args, steps=3, guidance=1.0),
    )


def test_a_base_sample_is_bit_identical_whatever_its_batch(runs):
    """One route from text to features: a prompt's features never depend on its batch companions."""
    text = runs["base"].model.conditioners["text"]
    prompts = ["Right effusion.", "Normal lungs with a much longer report than the first one.", "Emphysema."]
    together = text.encode(prompts)
    for i, prompt in enumerate(prompts):
        alone = text.encode([prompt])
        n = alone["context"].shape[1]
        assert torch.equal(alone["context"][0], together["context"][i, :n])
        assert not together["context"][i, n:].any()


def test_a_grid_the_schedule_cannot_take_is_refused_before_sampling():
    from types import SimpleNamespace

    from medsyn.diffusion import RectifiedFlowSchedule
    from medsyn.errors import ConfigError

    rf_run = SimpleNamespace(
        model=SimpleNamespace(denoiser=SimpleNamespace(schedule=RectifiedFlowSchedule()))
    )
    SampleOptions().check_models(rf_run, None)  # its own (uniform) grid
    with pytest.raises(ConfigError, match="grid 'logsnr'.*use the uniform grid"):
        SampleOptions(grid="logsnr").check_models(rf_run, None)
