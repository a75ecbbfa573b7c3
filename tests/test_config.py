import pytest
from omegaconf import OmegaConf

from medsyn.config import check_keys, load_yaml, merge_checked, parse_overrides
from medsyn.errors import ConfigError


def test_overrides_merge_with_yaml_types():
    base = OmegaConf.create({"trainer": {"max_steps": 10, "precision": "32"}, "model": {"preset": "x"}})
    merged = merge_checked(
        base, parse_overrides(["trainer.max_steps=20", "model.dropout=0.1"]), "cfg", open_keys=["model"]
    )
    assert merged.trainer.max_steps == 20 and merged.model.dropout == 0.1


def test_unknown_override_names_key_section_and_valid_keys():
    base = OmegaConf.create({"trainer": {"max_steps": 10, "precision": "32"}})
    with pytest.raises(ConfigError) as err:
        merge_checked(base, parse_overrides(["trainer.max_step=20"]), "configs/x.yaml")
    msg = str(err.value)
    assert "trainer.max_step" in msg and "configs/x.yaml" in msg and "max_steps" in msg and "precision" in msg


@pytest.mark.parametrize("bad", ["max_steps", "=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides([bad])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listy)


def test_check_keys():
    check_keys({"a": 1}, ["a", "b"], "here")
    with pytest.raises(ConfigError, match="unknown key 'c' in here; valid keys: a, b"):
        check_keys({"c": 1}, ["a", "b"], "here")
