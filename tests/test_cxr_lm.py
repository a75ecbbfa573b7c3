"""`train.py cxr`: a tiny GPT-2 over a tiny VQ-GAN's codes on tiny radiographs, with keypatch clues from a
tiny 2D alignment codebook: the run directory, the reload, retrieval without the subject's own keypatches,
condition dropout, exact resume and the config's checks."""

from __future__ import annotations

import json

import pytest
import torch
from cxr_fixtures import CODES, cxr_overrides, make_codebook, make_radiographs, make_vqgan

from medsyn.data.datamodule import report_text
from medsyn.errors import ConfigError
from medsyn.generation.cxr import KeypatchClues
from medsyn.radiograph.cache import read_radiograph_manifest
from medsyn.radiograph.lm import load_lm_run, rebuild_lm
from medsyn.radiograph.sequence import IGNORE, collate
from medsyn.radiograph.vqgan import load_vqgan
from medsyn.training.config import load_run_config
from medsyn.training.cxr import TOKENS_DIR, TokenDataset, train_cxr
from medsyn.weights import load_weights, sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    """A tiny VQ-GAN run directory (untrained)."""
    return make_vqgan(tmp_path_factory.mktemp("vqgan"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vqgan):
    base = tmp_path_factory.mktemp("cxr_lm")
    cache = make_radiographs(base / "cache")
    align, codebook = make_codebook(base, cache)
    cfg = load_run_config("cxr", None, cxr_overrides(cache, vqgan, base / "run", (align, codebook)))
    return {"base": base, "cache": cache, "align": align, "codebook": codebook, "vqgan": vqgan,
            "run_dir": train_cxr(cfg)}  # fmt: skip


def test_the_run_directory(trained):
    run_dir = trained["run_dir"]
    for name in ("config.yaml", "checkpoints/last.ckpt", "model.safetensors", "tokenizer/tokenizer.json",
                 "metrics.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / TOKENS_DIR).glob("images-*.safetensors"))) == 1
    assert len(list((run_dir / TOKENS_DIR).glob("keypatches-*.json"))) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["keypatches"] is True and metrics["subjects"] >= 1
    assert metrics["image_tokens_per_image"] == (32 // 4) ** 2
    assert 1.0 < metrics["image_token_perplexity"] < 10 * metrics["uniform_perplexity"]
    assert metrics["uniform_perplexity"] == CODES
    _, config = load_weights(run_dir / "model.safetensors")
    assert config["stage"] == "cxr" and config["vqgan_sha256"] == sha256_file(
        trained["vqgan"] / "model.safetensors"
    )
    assert config["layout"]["keypatch_grid"] == [2, 2] and config["layout"]["max_keypatches"] == 3


def test_reload_gives_the_trained_logits(trained):
    run_dir = trained["run_dir"]
    run = load_lm_run(run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained_model = rebuild_lm(run.config["lm_config"])
    trained_model.load_state_dict({k[len("model.") :]: v for k, v in ckpt["state_dict"].items()})
    trained_model.eval()
    layout = run.layout
    rows = [layout.sequence([7, 8, 9], None, torch.randint(0, 32, layout.image_grid))[0],
            layout.condition([], None)]  # fmt: skip
    batch = collate([{"input_ids": r} for r in rows], layout.vocab.pad, "left")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        assert torch.equal(run.model(**inputs).logits, trained_model(**inputs).logits)
    assert len(run.tokenizer) == layout.vocab.text_size
    assert run.model.get_input_embeddings().weight.shape[0] == layout.vocab.size


def test_training_retrieval_excludes_the_subjects_own_keypatches(trained):
    run_dir, cache = trained["run_dir"], trained["cache"]
    found = json.loads(next((run_dir / TOKENS_DIR).glob("keypatches-*.json")).read_text())["subjects"]
    rows = read_radiograph_manifest(cache)
    assert set(found) == {r["id"] for r in rows}
    assert sum(len(v) for v in found.values()) > 0
    for subject, clues in found.items():
        assert len(clues) <= 3 and all(clue[3] != subject for clue in clues)
    # without the exclusion a training subject's report does retrieve its own keypatches (the test can fail)
    clues = KeypatchClues.load({"align": trained["align"], "codebook": trained["codebook"], "k3": 2,
                                "max_keypatches": 3}, load_vqgan(trained["vqgan"]))  # fmt: skip
    own = [r for r in rows if any(c.subject == r["id"] for c in clues.retrieve(report_text(r)))]
    assert own, "no subject retrieves its own keypatches even without the exclusion"
    assert clues.codes.shape == (len(clues.codebook), 2, 2)  # 8^2-pixel crops -> 2 x 2 codes


def test_condition_dropout_is_seeded_by_the_draw(trained):
    run = load_lm_run(trained["run_dir"])
    layout = run.layout
    item = {"id": "a", "report": [7, 8, 9], "keypatches": torch.zeros(2, 2, 2, dtype=torch.long),
            "codes": torch.zeros(layout.image_grid, dtype=torch.long)}  # fmt: skip
    dataset = TokenDataset([item], layout, ucg_rate=0.25, seed=3)
    full = len(layout.sequence([7, 8, 9], item["keypatches"], item["codes"])[0])
    lengths = [len(dataset[(0, draw)]["input_ids"]) for draw in range(400)]
    dropped = sum(n < full for n in lengths) / len(lengths)
    assert 0.15 < dropped < 0.35
    assert lengths == [len(dataset[(0, draw)]["input_ids"]) for draw in range(400)]  # the same on a rerun
    assert len(dataset[0]["input_ids"]) == full  # evaluation (no draw): never dropped
    sample = dataset[0]
    assert (sample["labels"] != IGNORE).sum() == layout.image_tokens + 1


def test_resume_continues_exactly(tmp_path, vqgan):
    cache = make_radiographs(tmp_path / "cache", n=8)
    common = cxr_overrides(cache, vqgan, tmp_path / "a", **{"data.batch_size": 2, "effective_batch_size": 2})
    straight = train_cxr(load_run_config("cxr", None, [*common, "trainer.max_steps=4"]))
    halted = cxr_overrides(cache, vqgan, tmp_path / "b", **{"data.batch_size": 2, "effective_batch_size": 2})
    train_cxr(load_run_config("cxr", None, halted))
    resumed = train_cxr(load_run_config("cxr", None, [*halted, "trainer.max_steps=4"]))
    a, _ = load_weights(straight / "model.safetensors")
    b, config = load_weights(resumed / "model.safetensors")
    assert config["global_step"] == 4
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="n_layers"):
        load_run_config("cxr", None, ["model.config.n_layers=2"])
    with pytest.raises(ConfigError, match="keypatches"):
        load_run_config("cxr", None, ["keypatches={align: a, codebook: b, k4: 3}"])
    with pytest.raises(ConfigError, match="ucg_rate"):
        load_run_config("cxr", None, ["sequence.ucg_rate=1.5"])
    with pytest.raises(ConfigError, match="model_type"):
        load_run_config("cxr", None, ["model.config.model_type=nonsense"])


def test_too_few_positions_is_refused_before_training(tmp_path, vqgan):
    cache = make_radiographs(tmp_path / "cache", n=6)
    cfg = load_run_config("cxr", None, cxr_overrides(cache, vqgan, tmp_path / "run",
                                                     **{"model.config.n_positions": 64}))  # fmt: skip
    with pytest.raises(ConfigError, match="positions"):
        train_cxr(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
