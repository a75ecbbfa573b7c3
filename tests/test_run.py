"""Loading a run directory (medsyn.generation.run): relative paths in the stored config, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_fixtures import make_cache, make_text_model

from medsyn.config import to_container
from medsyn.errors import DataError
from medsyn.generation.model import build_diffusion_model
from medsyn.generation.run import load_run
from medsyn.training.config import load_run_config
from medsyn.weights import export_weights, load_weights


def export_base(run_dir: Path, **overrides: str) -> None:
    """A tiny base run whose stored config holds `overrides` as written (e.g. relative paths)."""
    cfg = to_container(load_run_config("base", None, ["model.preset=base-tiny"]))
    cfg["data"]["phantoms"] = None  # the grid must come from the cache at data.root, if it is found
    model = build_diffusion_model({**cfg, "text": {**cfg["text"], "model": str(overrides["bert"])}})
    cfg["text"]["model"], cfg["data"]["root"] = overrides["text_model"], overrides["data_root"]
    export_weights(run_dir / "model.safetensors", model.exported_state(), {**cfg, "global_step": 0})


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository as training leaves it: runs/demo/{bert,base} and data/cache, paths relative to it."""
    root = tmp_path_factory.mktemp("repo")
    bert = make_text_model(root / "runs" / "demo" / "bert")
    make_cache(root / "data" / "cache", n=1, size=16)
    export_base(
        root / "runs" / "demo" / "base", bert=bert, text_model="runs/demo/bert", data_root="data/cache"
    )
    export_base(
        root / "runs" / "demo" / "lost", bert=bert, text_model="runs/demo/gone", data_root="data/cache"
    )
    return root


def test_relative_paths_resolve_from_the_run_directory_anywhere(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where training ran
    run = load_run(repo / "runs" / "demo" / "base")
    assert Path(run.model.conditioners["text"].model_name) == repo / "runs" / "demo" / "bert"
    assert run.hr_grid.source == f"cache {repo / 'data' / 'cache'}" and run.hr_grid.shape == (16, 16, 16)


def test_missing_text_model_names_the_run_the_setting_and_the_path(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = repo / "runs" / "demo" / "lost"
    with pytest.raises(DataError) as info:
        load_run(run_dir)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(run_dir) in message
    assert "text.model" in message and "runs/demo/gone" in message and "weights do not match" not in message


@pytest.mark.parametrize("recorded", [None, "medsyn-0"])
def test_a_run_of_an_earlier_channel_encoding_is_refused(repo, tmp_path, recorded):
    state, config = load_weights(repo / "runs" / "demo" / "base" / "model.safetensors")
    del config["encoding"], config["lobe_encoding"]  # as medsyn-1 wrote it
    if recorded is not None:
        config["encoding"] = recorded
    weights = tmp_path / "old" / "model.safetensors"
    export_weights(weights, state, config)
    with pytest.raises(DataError) as info:
        load_run(weights.parent)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(weights) in message and "retrain" in message
    assert ("trained with the medsyn-1 lobe encoding" if recorded is None else repr(recorded)) in message
