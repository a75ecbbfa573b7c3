"""The one builder of a run's model: conditioners from config sections, UNet arguments they fix,
exported weights round-trip strictly, and configs of earlier versions keep loading."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import make_text_model

from medsyn.conditioning import LowResConditioner, TextConditioner
from medsyn.config import to_container
from medsyn.errors import ConfigError
from medsyn.generation.model import DiffusionModel, build_diffusion_model, legacy_keys, upgrade_config
from medsyn.training.config import load_run_config


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_text_model(tmp_path_factory.mktemp("text") / "bert", hidden_size=32)


def config(stage: str, bert=None, *extra: str) -> dict:
    over = [f"model.preset={stage}-tiny", *extra] + ([f"text.model={bert}"] if bert else [])
    return to_container(load_run_config(stage, None, over))


def test_sections_choose_the_conditioners(bert):
    base = build_diffusion_model(config("base", bert))
    assert list(base.conditioners) == ["text"] and isinstance(base.conditioners["text"], TextConditioner)
    assert base.denoiser.net.cross_attention_dim == 32  # fixed by the text conditioner's hidden size
    sr = build_diffusion_model(config("sr"))
    assert list(sr.conditioners) == ["lowres"] and isinstance(sr.conditioners["lowres"], LowResConditioner)
    assert sr.conditioners["lowres"].noise_max == 0.2 and sr.conditioners["lowres"].noise_sample == 0.05


def test_condition_and_guidance_branch(bert):
    base = build_diffusion_model(config("base", bert))
    cond = base.condition({"text": ["Effusion.", "Normal."]})
    uncond = base.unconditional(cond)
    assert cond["context"].shape == uncond["context"].shape and not uncond["context"].any()
    sr = build_diffusion_model(config("sr"))
    lowres = torch.zeros(2, 4, 8, 8, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = sr.condition({"lowres": lowres}, generator=gens)
    assert out["concat"].shape == lowres.shape and torch.equal(out["aug_t"], torch.full((2,), 0.05))
    assert sr.unconditional(out) is None  # no guidance for the SR model
    with pytest.raises(KeyError, match="lowres"):
        sr.condition({"text": ["x"]})


def test_lowres_conditioner_uses_the_denoisers_schedule():
    sr = build_diffusion_model(config("sr", None, "diffusion.schedule_shift=2.0"))
    assert sr.conditioners["lowres"].schedule.shift == sr.denoiser.schedule.shift == 2.0


@pytest.mark.parametrize(("lobe_encoding", "channels"), [("levels", 4), ("bits", 6)])
def test_the_lobe_encoding_sets_the_networks_channels(bert, lobe_encoding, channels):
    base = build_diffusion_model(config("base", bert, f"lobe_encoding={lobe_encoding}"))
    assert (base.denoiser.net.in_channels, base.out_channels) == (channels, channels)
    sr = build_diffusion_model(config("sr", None, f"lobe_encoding={lobe_encoding}"))
    assert (sr.denoiser.net.in_channels, sr.out_channels) == (2 * channels, channels)  # + the concatenated
    assert sr.conditioners["lowres"].lobe_encoding == lobe_encoding
    x = torch.zeros(1, 4, 8, 8, 8)
    x[:, 1, :4] = 1.0  # right lower lobe in half the volume
    net = sr.to_net(x)
    assert net.shape == (1, channels, 8, 8, 8) and torch.equal(sr.from_net(net), x)
    assert sr.condition({"lowres": x}, generator=[torch.Generator()])["concat"].shape == net.shape
    rewrapped = DiffusionModel(sr.denoiser, sr.conditioners)  # e.g. around the EMA denoiser (previews)
    assert rewrapped.lobe_encoding == lobe_encoding


def test_bad_encodings_are_named():
    with pytest.raises(ConfigError, match="lobe_encoding='trits'.*levels, bits"):
        load_run_config("sr", None, ["lobe_encoding=trits"])
    with pytest.raises(ConfigError, match="encoding='medsyn-1'.*medsyn-2"):
        load_run_config("sr", None, ["encoding=medsyn-1"])
    with pytest.raises(ConfigError, match="lobe_encoding='trits'"):
        build_diffusion_model({**config("sr"), "lobe_encoding": "trits"})
    with pytest.raises(ConfigError, match="lobe_encoding"):  # a run setting, not one of the section's
        load_run_config("sr", None, ["lowres.lobe_encoding=bits"])


def test_exported_state_round_trips_strictly(bert):
    a, b = build_diffusion_model(config("base", bert)), build_diffusion_model(config("base", bert))
    with torch.no_grad():
        for p in a.denoiser.net.parameters():
            p.add_(1.0)
    state = a.exported_state()
    assert all(k.startswith(("net.", "text.")) for k in state) and not any("encoder" in k for k in state)
    b.load_exported_state(state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="unexpected weights"):
        b.load_exported_state({**state, "lowres.x": torch.zeros(1)})


def test_wrong_keys_are_named():
    with pytest.raises(ConfigError, match="noise_maxx"):
        load_run_config("sr", None, ["lowres.noise_maxx=0.1"])
    with pytest.raises(ConfigError, match="loss.time_samplingg"):
        load_run_config("sr", None, ["loss.time_samplingg=uniform"])
    with pytest.raises(ConfigError, match="data.resolution"):
        load_run_config("sr", None, ["data.resolution=mid"])


def test_legacy_configs_are_upgraded(tmp_path, capsys):
    old = {"stage": "sr", "model": {"preset": "sr-tiny"}, "data": {"root": "x", "upsample": "trilinear"},
           "diffusion": {"schedule": "cosine", "parameterization": "x0", "time_sampling": "uniform",
                         "lowres_noise_max": 0.3, "lowres_noise_sample": 0.1}}  # fmt: skip
    assert set(legacy_keys(old)) == {"data.upsample", "diffusion.time_sampling", "diffusion.lowres_noise_max",
                                     "diffusion.lowres_noise_sample"}  # fmt: skip
    new = upgrade_config(old)
    assert new["lowres"] == {"noise_max": 0.3, "noise_sample": 0.1, "upsample": "trilinear"}
    assert new["loss"] == {"time_sampling": "uniform"} and new["data"]["resolution"] == "hr"
    assert "upsample" not in new["data"] and "lowres_noise_max" not in new["diffusion"]
    assert build_diffusion_model(new).conditioners["lowres"].upsample_mode == "trilinear"
    path = tmp_path / "old.yaml"
    path.write_text("diffusion:\n  lowres_noise_max: 0.3\ndata:\n  upsample: trilinear\n")
    cfg = load_run_config("sr", path)
    assert cfg.lowres.noise_max == 0.3 and cfg.lowres.upsample == "trilinear"
    assert "moved keys of an earlier version" in capsys.readouterr().out
