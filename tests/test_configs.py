"""Every config the repository ships loads and validates: a typo in a recipe fails here, not an hour in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsyn.evaluation.controllability import load_pairs
from medsyn.training.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if "stage" in (yaml.safe_load(p.read_text()) or {})
)


def test_the_recipes_are_found():
    names = {str(p.relative_to(ROOT)) for p in RUN_CONFIGS}
    assert {
        "configs/base.yaml",
        "configs/demo/base.yaml",
        "configs/demo/sr.yaml",
        "configs/phantom/base.yaml",
    } <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_run_configs_validate(path):
    stage = yaml.safe_load(path.read_text())["stage"]
    cfg = load_run_config(stage, path)
    assert cfg.stage == stage


def test_demo_pairs_and_prompts_load():
    import importlib.util

    pairs = load_pairs(ROOT / "configs/demo/effusion_pairs.yaml")
    assert [p.name for p in pairs] == ["demo_effusion", "unseen_wording"]
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    prompts = sample.read_prompts(ROOT / "configs/demo/prompts.jsonl")
    assert len(prompts) == 2 and {seed for _, seed in prompts} == {0}  # one body, two reports
