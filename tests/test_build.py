import pytest
import torch

import medsyn
from medsyn.errors import ConfigError
from medsyn.nn.presets import PRESETS


def test_build_from_preset_with_overrides():
    model = medsyn.build_model("base-tiny", num_res_blocks=2)
    assert model.config["num_res_blocks"] == 2
    assert model.config["num_channels"] == PRESETS["base-tiny"]["num_channels"]
    assert next(model.parameters()).device.type == "cpu"


def test_build_from_mapping_and_yaml(tmp_path):
    model = medsyn.build_model({"preset": "sr-tiny", "transformer_depth": 2})
    assert len(model.mid_attn.blocks) == 2
    path = tmp_path / "model.yaml"
    path.write_text("model:\n  preset: base-tiny\n  dropout: 0.1\n")
    assert medsyn.build_model(path).config["dropout"] == 0.1
    plain = tmp_path / "plain.yaml"
    plain.write_text("spatial_dims: 2\nnum_channels: [8, 16]\nnorm_num_groups: 8\nnum_head_channels: 8\n")
    model2d = medsyn.build_model(str(plain))
    assert model2d(torch.randn(1, 4, 8, 8), torch.rand(1)).shape == (1, 4, 8, 8)


def test_dtype_and_meta_device():
    model = medsyn.build_model("base-tiny", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(medsyn.build_model("base-700m", device="meta").parameters()).is_meta


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key 'num_chanels'.*did you mean 'num_channels'.*valid keys"
    ):
        medsyn.build_model("base-tiny", num_chanels=[8])
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: base-tiny\n  widht: 3\n")
    with pytest.raises(ConfigError, match=str(path)):
        medsyn.build_model(path)


def test_unknown_preset_and_bad_values():
    with pytest.raises(ConfigError, match="unknown model preset 'base-7b'.*base-700m"):
        medsyn.build_model("base-7b")
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        medsyn.build_model({"preset": "nope"})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        medsyn.build_model("base-tiny", num_channels=[12, 24])
