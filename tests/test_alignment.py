"""`train.py align`: words from wordpieces, the volume encoder, the contrastive losses, a tiny run with exact
resume and held-out metrics, and `load_align_run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from training_fixtures import align_overrides, make_cache, make_text_model

from medsyn.alignment import (
    PRESETS,
    ReportEncoder,
    VolumeEncoder,
    chance_accuracy,
    global_contrastive_loss,
    load_align_run,
    local_contrastive_loss,
    patch_box,
    report_positives,
    retrieval_accuracy,
    tokenize_words,
    word_patch_scores,
    word_pooling,
)
from medsyn.conditioning.tiny_bert import train_tokenizer
from medsyn.data.cache import write_manifest
from medsyn.errors import ConfigError, DataError
from medsyn.training.align import train_align
from medsyn.training.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def train_py():
    """The `train.py` entry point, loaded from its file (it is not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("align")
    cache = make_cache(base / "cache", n=16, size=16, factor=2)  # 8^3 base grid
    write_manifest(cache, fractions=(0.5, 0.25, 0.25))  # 11 train, 2 val, 3 test subjects
    return {"cache": cache, "bert": make_text_model(base / "bert")}


def overrides(assets, run_dir, **extra) -> list[str]:
    return align_overrides(assets["cache"], assets["bert"], run_dir, **extra)


# ---- words -----------------------------------------------------------------------------------------
def test_wordpieces_merge_into_words_without_punctuation_or_special_tokens():
    corpus = ["No pleural effusion.", "The heart is enlarged."] * 3
    tokenizer = train_tokenizer(corpus, vocab_size=70)  # too few entries for whole words: they split
    texts = ["Large effusion, right-sided.", "Heart enlarged."]
    inputs, words, spans = tokenize_words(tokenizer, texts, max_length=32)
    assert words == [["Large", "effusion", "right", "sided"], ["Heart", "enlarged"]]
    ids = inputs["input_ids"]
    for b in range(2):
        for word, (start, end) in zip(words[b], spans[b], strict=True):
            pieces = tokenizer.convert_ids_to_tokens(ids[b, start:end].tolist())
            assert tokenizer.convert_tokens_to_string(pieces).replace(" ", "") == word.lower()
            assert all(p not in tokenizer.all_special_tokens for p in pieces)
    assert any(end - start > 1 for start, end in spans[0])  # at least one word of several pieces
    assert spans[1][-1][1] < int(inputs["attention_mask"][1].sum())  # the shorter report's padding is no word
    truncated = tokenize_words(tokenizer, texts, max_length=4)[1]
    assert len(truncated[0]) < 4
    assert tokenize_words(tokenizer, ["Small: 5 mm!"], 16)[1] == [
        ["Small", "5", "mm"]
    ]  # [UNK]s keep their text


def test_word_pooling_averages_the_pieces_of_each_word():
    weights, mask = word_pooling([[(1, 3), (3, 4)], [(1, 2)], []], length=5)
    assert weights.shape == (3, 2, 5) and mask.tolist() == [[True, True], [True, False], [False, False]]
    assert torch.allclose(weights[0, 0], torch.tensor([0, 0.5, 0.5, 0, 0]))
    assert torch.allclose(weights.sum(-1), mask.float())


def test_report_encoder_word_features_are_the_mean_of_their_pieces(assets):
    encoder = ReportEncoder(str(assets["bert"]), max_length=64, freeze=True).eval()
    texts = ["Large right pleural effusion.", "No acute abnormality."]
    feats = encoder(texts)
    inputs, words, spans = tokenize_words(encoder.tokenizer, texts, 64)
    tokens = encoder.encoder(**inputs).last_hidden_state
    for b, report in enumerate(spans):
        for w, (start, end) in enumerate(report):
            assert torch.allclose(feats.words[b, w], tokens[b, start:end].mean(0), atol=1e-5)
        assert torch.allclose(feats.pooled[b], feats.words[b, : len(report)].mean(0), atol=1e-5)
    assert feats.strings == words and not feats.words.requires_grad
    assert not any(k.startswith("encoder.") for k in encoder.state_dict())  # frozen: left out


# ---- volume encoder --------------------------------------------------------------------------------
def test_volume_encoder_gives_a_grid_of_patch_tokens():
    encoder = VolumeEncoder(**PRESETS["align-tiny"])
    tokens, grid = encoder(torch.randn(2, 4, 8, 12, 16))
    assert grid == (2, 3, 4) and tokens.shape == (2, 24, PRESETS["align-tiny"]["width"])
    assert patch_box(23, grid, 4) == (slice(4, 8), slice(8, 12), slice(12, 16))
    assert patch_box(5, grid, 4) == (slice(0, 4), slice(4, 8), slice(4, 8))
    with pytest.raises(ValueError, match="multiple of patch_size=4"):
        encoder(torch.randn(1, 4, 8, 8, 10))
    with pytest.raises(ValueError, match="num_heads"):
        VolumeEncoder(width=30, num_heads=4)


# ---- losses ----------------------------------------------------------------------------------------
def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_global_loss_is_lower_for_aligned_pairs():
    reports = _unit(6, 16)
    volumes = F.normalize(reports + 0.1 * _unit(6, 16, seed=1), dim=-1)
    scale = torch.tensor(10.0)
    aligned = global_contrastive_loss(reports, volumes, scale)
    shuffled = global_contrastive_loss(reports, volumes.roll(1, 0), scale)
    assert aligned.shape == (6,) and float(aligned.mean()) < float(shuffled.mean()) - 1.0


def _aligned_local(b: int = 4, w: int = 3, p: int = 10, d: int = 16):
    """Volumes whose first patches are their report's words, the other patches noise."""
    words = _unit(b, w, d)
    patches = torch.cat([words, _unit(b, p - w, d, seed=2)], dim=1)  # (B, P, D)
    return words, torch.ones(b, w, dtype=torch.bool), patches


@pytest.mark.parametrize("pool", ["max", "softmax"])
def test_local_loss_is_lower_for_aligned_pairs(pool):
    words, mask, patches = _aligned_local()
    scale = torch.tensor(10.0)
    aligned = local_contrastive_loss(words, mask, patches, scale, pool=pool)
    shuffled = local_contrastive_loss(words, mask, patches.roll(1, 0), scale, pool=pool)
    assert aligned.shape == (4,) and float(aligned.mean()) < float(shuffled.mean()) - 0.5
    to_volume, to_report = word_patch_scores(words, mask, patches, pool=pool)
    assert to_volume.shape == to_report.shape == (4, 4)
    if pool == "max":
        assert torch.allclose(to_volume.diagonal(), torch.ones(4))  # every word finds itself


@pytest.mark.parametrize("pool", ["max", "softmax"])
def test_padding_words_are_ignored(pool):
    words, mask, patches = _aligned_local()
    padded = torch.cat([words, _unit(4, 2, 16, seed=5)], dim=1)  # two garbage words per report...
    padded_mask = torch.cat([mask, torch.zeros(4, 2, dtype=torch.bool)], dim=1)  # ...masked out
    scale = torch.tensor(10.0)
    expected = local_contrastive_loss(words, mask, patches, scale, pool=pool)
    assert torch.allclose(
        local_contrastive_loss(padded, padded_mask, patches, scale, pool=pool), expected, atol=1e-6
    )
    unmasked = local_contrastive_loss(padded, torch.ones(4, 5, dtype=torch.bool), patches, scale, pool=pool)
    assert not torch.allclose(unmasked, expected)


def test_a_report_without_words_gives_finite_loss_and_gradients():
    words, mask, patches = _aligned_local()
    words = words.clone().requires_grad_(True)
    mask = mask.clone()
    mask[2] = False
    for pool in ("max", "softmax"):
        loss = local_contrastive_loss(words, mask, patches, torch.tensor(10.0), pool=pool).sum()
        (grad,) = torch.autograd.grad(loss, words)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and float(grad[2].abs().sum()) == 0.0


def test_retrieval_accuracy_and_its_chance_level():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.7]])
    positives = torch.eye(3, dtype=torch.bool)
    assert retrieval_accuracy(scores, positives, 1) == pytest.approx(2 / 3)
    assert retrieval_accuracy(scores, positives, 2) == 1.0
    assert chance_accuracy(positives, 1) == pytest.approx(1 / 3) and chance_accuracy(positives, 5) == 1.0
    # subjects whose reports are the same text (whitespace aside) are hits for each other
    positives = report_positives(["No effusion.", "Nodule.", "No  effusion. "])
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    swapped = torch.tensor([[0.1, 0.0, 0.9], [0.8, 0.2, 0.1], [0.7, 0.0, 0.1]])  # 0 and 2 find each other
    assert retrieval_accuracy(swapped, positives, 1) == pytest.approx(2 / 3)
    assert retrieval_accuracy(swapped, torch.eye(3, dtype=torch.bool), 1) == 0.0
    assert chance_accuracy(positives, 1) == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)


# ---- training, resume, metrics, loading ------------------------------------------------------------
def test_train_py_align_writes_a_run_that_loads(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_py().main(["align", *overrides(assets, run_dir)]) == 0
    assert "metrics.json" in capsys.readouterr().out
    assert {"config.yaml", "model.safetensors", "metrics.json", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["subjects"] == 3 and metrics["global_step"] == 2
    for key in ("report_to_volume_top1", "report_to_volume_top5", "volume_to_report_top1", "volume_to_report_top5",
                "local_report_to_volume_top1", "local_volume_to_report_top5", "chance_top1"):  # fmt: skip
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["report_to_volume_top5"] == 1.0  # 3 candidates
    assert -1.0 <= metrics["unmatched_similarity"] <= 1.0 and -1.0 <= metrics["matched_similarity"] <= 1.0
    weights = load_file(run_dir / "model.safetensors")
    assert weights and not any(
        k.startswith("text.encoder.") for k in weights
    )  # frozen: reloads from text.model

    run = load_align_run(run_dir)
    assert not run.model.training and run.patch_size == 4
    x = torch.randn(2, 4, 8, 8, 8)
    global_, patches, grid = run.encode_volumes(x)
    assert global_.shape == (2, 16) and patches.shape == (2, 8, 16) and grid == (2, 2, 2)
    assert torch.allclose(global_.norm(dim=-1), torch.ones(2), atol=1e-5)
    reports, words, feats = run.encode_reports(["Large right pleural effusion.", "No acute abnormality."])
    assert reports.shape == (2, 16) and words[0] == ["Large", "right", "pleural", "effusion"]
    assert [f.shape for f in feats] == [(4, 16), (3, 16)]
    similarity = run.word_patch_similarity(feats[0], patches[0])
    assert similarity.shape == (4, 8) and float(similarity.abs().max()) <= 1.0 + 1e-5
    assert run.patch_box(7, grid) == (slice(4, 8), slice(4, 8), slice(4, 8))
    assert run.tokenizer is run.model.text.tokenizer


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(assets, tmp_path):
    # fine-tuned text encoder and dropout: the random state must continue exactly from the checkpoint
    extra = {"text.freeze": False, "model.dropout": 0.1, "trainer.max_steps": 3}
    whole = train_align(load_run_config("align", None, overrides(assets, tmp_path / "whole", **extra)))
    parts = tmp_path / "parts"
    train_align(load_run_config("align", None, overrides(assets, parts, **{**extra, "trainer.max_steps": 2})))
    train_align(load_run_config("align", None, overrides(assets, parts, **extra)))
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert any(k.startswith("text.encoder.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((parts / "metrics.json").read_text())["global_step"] == 3


def test_bad_settings_are_one_line_errors(assets, tmp_path, capsys):
    def config(**extra):
        return load_run_config("align", None, overrides(assets, tmp_path / "run", **extra))

    with pytest.raises(ConfigError, match="unknown key 'patch'"):
        config(**{"model.patch": 4})
    with pytest.raises(ConfigError, match="loss.local_pool='mean'"):
        config(**{"loss.local_pool": "mean"})
    with pytest.raises(ConfigError, match="data.batch_size=1"):
        config(**{"data.batch_size": 1})
    with pytest.raises(ConfigError, match="both 0"):
        config(**{"loss.global_weight": 0, "loss.local_weight": 0})
    with pytest.raises(ConfigError, match="model.patch_size=3"):
        train_align(config(**{"model.patch_size": 3}))
    assert not (tmp_path / "run").exists()  # refused before the run directory is written
    with pytest.raises(DataError, match="no such weights file"):
        load_align_run(tmp_path)
    assert train_py().main(["align", "model.preset=align-huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.preset='align-huge'" in err[0]


def test_demo_config_aligns_the_phantom_recipe_data_with_the_demo_text_encoder():
    cfg = load_run_config("align", ROOT / "configs/demo/align.yaml")
    text = load_run_config("text", ROOT / "configs/demo/text.yaml")
    assert Path(cfg.text.model) == Path(text.run_dir) / "text_encoder"
    assert (
        cfg.data.root == "data/phantom/cache" and PRESETS[cfg.model.preset]["patch_size"] == 4
    )  # 8^3 at 32^3
    assert cfg.trainer.accelerator == "cpu" and cfg.stage == "align"
