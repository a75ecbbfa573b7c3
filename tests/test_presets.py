"""The paper-scale presets: size, cost and attention placement, counted on the meta device."""

import pytest

import medsyn
from medsyn.nn.blocks import Attention, SpatialTransformer
from medsyn.nn.inspect import profile_model
from medsyn.nn.presets import DEFAULT_SIZE, PRESETS


@pytest.fixture(scope="module")
def profiles():
    out = {}
    for name in ("base-700m", "sr-light"):
        model = medsyn.build_model(name, device="meta")
        assert all(p.is_meta for p in model.parameters())  # no memory was used
        out[name] = (model, profile_model(model, DEFAULT_SIZE[name]))
    return out


def test_base_700m_size_and_cost(profiles):
    model, prof = profiles["base-700m"]
    assert 650e6 <= prof.params <= 750e6
    assert prof.flops <= 4e12  # MedSyn's released base: 12.1 TFLOP at 64^3
    assert model.in_channels == 4 and model.out_channels == 4 and model.cross_attention_dim == 768


def test_sr_light_size_and_cost(profiles):
    model, prof = profiles["sr-light"]
    assert 30e6 <= prof.params <= 80e6
    assert prof.flops <= 15e12  # MedSyn's SR: 81.5 TFLOP at 256^3
    assert model.in_channels == 8 and model.out_channels == 4 and model.cross_attention_dim is None


@pytest.mark.parametrize("name", ["base-700m", "sr-light"])
def test_attention_only_at_the_bottleneck(profiles, name):
    model, prof = profiles[name]
    transformers = [n for n, m in model.named_modules() if isinstance(m, SpatialTransformer)]
    assert transformers == ["mid_attn"]  # no attention module in the encoder or decoder levels
    assert all(n.startswith("mid_attn.") for n, m in model.named_modules() if isinstance(m, Attention))
    assert len(prof.attention_levels) == 1 and prof.attention_levels[0]["at_bottleneck"]
    assert prof.attention_levels[0]["resolution"] == prof.bottleneck_shape
    if name == "sr-light":
        assert len(model.mid_attn.blocks) == 1  # at most one attention block at the bottom


def test_attention_levels_are_reported_where_they_run():
    model = medsyn.build_model("base-tiny", device="meta", attention_levels=[True, False])
    prof = profile_model(model, 16)
    levels = {(e["level"], e["at_bottleneck"]) for e in prof.attention_levels}
    assert levels == {(0, False), (1, True)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta(name):
    model = medsyn.build_model(name, device="meta")
    assert profile_model(model, DEFAULT_SIZE[name]).flops > 0
