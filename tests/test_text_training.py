"""`train.py text`: report pairs, masking, position extension, a tiny fine-tune exported for the conditioner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import make_text_model

from medsyn.conditioning import TextConditioner
from medsyn.conditioning.tiny_bert import train_tokenizer
from medsyn.data.phantom import write_dataset
from medsyn.data.reports import ReportCollator, ReportPairs, read_reports
from medsyn.errors import ConfigError, DataError
from medsyn.training.config import load_run_config
from medsyn.training.text import ENCODER_DIR, build_pretraining_model, extend_positions, train_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("reports") / "ph", 40, size=8, seed=3, progress=False)


def tiny(run_dir: Path, root: Path, *extra: str):
    return load_run_config("text", None, [
        f"run_dir={run_dir}", f"data.root={root}", "model.name=null", "model.scratch.hidden_size=32",
        "model.scratch.num_layers=1", "model.scratch.num_heads=2", "model.scratch.vocab_size=300",
        "data.max_length=64", "data.batch_size=8", "effective_batch_size=8", "optim.lr=1e-3",
        "optim.warmup_steps=0", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.precision=32", "trainer.enable_progress_bar=false", "logger.kind=none",
        "checkpoint.every_n_steps=3", *extra,
    ])  # fmt: skip


def test_pairs_swap_half_with_a_differing_impression_deterministically(reports):
    rows = [r for r in read_reports(reports) if r["split"] == "train"]
    pairs = ReportPairs(rows, swap_probability=0.5, seed=0)
    items = [pairs[(i % len(pairs), i)] for i in range(200)]
    swapped = [it for it in items if it["paired_label"]]
    assert 60 < len(swapped) < 140
    for it in swapped:
        own = next(r["impression"] for r in rows if r["findings"] == it["findings"])
        assert it["impression"] != own
    assert [pairs[(3, 17)] for _ in range(2)][0] == pairs[(3, 17)]
    evaluation = [pairs[i]["paired_label"] for i in range(len(pairs))]
    assert evaluation == [pairs[i]["paired_label"] for i in range(len(pairs))]


def test_collator_masks_about_15_percent_the_same_way_each_time(reports):
    rows = read_reports(reports)
    tokenizer = train_tokenizer([r["findings"] + " " + r["impression"] for r in rows], vocab_size=300)
    collate = ReportCollator(tokenizer, max_length=64, mlm_probability=0.15, seed=0)
    items = [ReportPairs(rows)[(i, i)] for i in range(16)]
    a, b = collate(items), collate(items)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    real = a["attention_mask"].bool() & (a["labels"] != -100)
    fraction = real.sum() / (a["attention_mask"].sum() - 3 * 16)  # [CLS] and two [SEP] are never masked
    assert 0.07 < float(fraction) < 0.25
    assert set(a) == {"input_ids", "token_type_ids", "attention_mask", "labels", "paired_label"}
    assert (a["token_type_ids"].amax(1) == 1).all()  # the Impression is segment B


def test_tokenizer_is_the_same_in_every_process(tmp_path, reports):
    code = (
        "import sys, json; from medsyn.conditioning.tiny_bert import train_tokenizer; "
        "from medsyn.data.reports import read_reports; rows = read_reports(sys.argv[1]); "
        "t = train_tokenizer([r['findings'] + ' ' + r['impression'] for r in rows], vocab_size=120); "
        "print(json.dumps(sorted(t.get_vocab().items(), key=lambda kv: kv[1])))"
    )
    runs = [subprocess.run([sys.executable, "-c", code, str(reports)], capture_output=True, text=True, check=True)
            for _ in range(2)]  # fmt: skip
    assert runs[0].stdout == runs[1].stdout and len(json.loads(runs[0].stdout)) == 120


def test_extend_positions_keeps_the_learned_rows(tmp_path, reports):
    cfg = tiny(tmp_path / "run", reports, "data.max_length=64")
    model = build_pretraining_model(cfg, vocab_size=50)
    old = model.bert.embeddings.position_embeddings.weight.detach().clone()
    extend_positions(model, 150)
    new = model.bert.embeddings.position_embeddings.weight
    assert new.shape[0] == 150 and model.config.max_position_embeddings == 150
    assert torch.equal(new[: old.shape[0]], old) and torch.equal(new[old.shape[0] : 2 * old.shape[0]], old)
    out = model(torch.ones(1, 140, dtype=torch.long))
    assert out.prediction_logits.shape == (1, 140, 50)


def test_tiny_fine_tune_exports_an_encoder_the_conditioner_loads(tmp_path, reports):
    run_dir = train_text(tiny(tmp_path / "run", reports))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["mlm_accuracy"] <= 1 and 0 <= metrics["pairing_accuracy"] <= 1
    assert (
        metrics["split"] in ("val", "test") and metrics["global_step"] == 6 and metrics["masked_tokens"] > 0
    )
    encoder = run_dir / ENCODER_DIR
    assert (encoder / "model.safetensors").is_file() and (encoder / "tokenizer.json").is_file()
    assert not list(encoder.glob("*.bin")) and (run_dir / "checkpoints" / "last.ckpt").is_file()
    conditioner = TextConditioner(str(encoder), max_length=64)
    context = conditioner.encode(["Large right pleural effusion."])
    assert context["context"].shape[-1] == 32
    # resume=auto continues the run to a later max_steps with the run's own tokenizer
    train_text(tiny(tmp_path / "run", reports, "trainer.max_steps=9"))
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 9


def test_fine_tune_from_a_local_encoder_without_heads(tmp_path, reports):
    bert = make_text_model(tmp_path / "bert")
    cfg = tiny(tmp_path / "run", reports, f"model.name={bert}", "trainer.max_steps=2")
    run_dir = train_text(cfg)
    state = TextConditioner(str(run_dir / ENCODER_DIR), max_length=64)
    assert state.encode(["No pleural effusion."])["context"].shape[-1] == 32


def test_config_errors(tmp_path, reports):
    with pytest.raises(ConfigError, match="objective.mlm_probability"):
        tiny(tmp_path, reports, "objective.mlm_probability=1.5")
    with pytest.raises(ConfigError, match="model.scratch"):
        tiny(tmp_path, reports, "model.scratch.num_heads=3")
    old = tmp_path / "old.yaml"
    old.write_text("stage: base\ntext_bootstrap: {hidden_size: 32}\n")
    with pytest.raises(ConfigError, match="text_bootstrap was replaced by `train.py text`"):
        load_run_config("base", old)
    with pytest.raises(DataError, match="no manifest.csv with reports"):
        train_text(tiny(tmp_path / "run", tmp_path / "nothing"))


def test_cli_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "text", "model.scratch.nope=1"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "model.scratch" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("path", ["configs/text.yaml", "configs/demo/text.yaml"])
def test_shipped_text_configs_load(path):
    cfg = load_run_config("text", ROOT / path)
    assert cfg.stage == "text" and cfg.objective.mlm_probability == 0.15


def test_demo_base_conditions_on_the_demo_text_encoder():
    base = load_run_config("base", ROOT / "configs/demo/base.yaml")
    text = load_run_config("text", ROOT / "configs/demo/text.yaml")
    assert Path(base.text.model) == Path(text.run_dir) / ENCODER_DIR
