"""`train.py text`: fine-tune the report encoder as MedSyn does (IV.A), on the corpus's own reports.

Two tasks at once on a BERT-family model (`transformers`' pre-training heads): masked language
modelling of 15% of the tokens, and paired-section prediction, a linear head on [CLS] telling whether
the Impression belongs to the Findings or was swapped in from another subject. It starts from a local
directory or hub name, or from scratch with a WordPiece tokenizer trained on the training reports.

The run directory follows the other stages (config.yaml, checkpoints/last.ckpt with exact resume,
logs) and gets `text_encoder/` (config, safetensors weights and tokenizer: what `text.model` of a base
run loads as it is) and `metrics.json` (`mlm_accuracy`, `pairing_accuracy` on the held-out split).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.io import atomic_dir, usual_mode, write_json
from medsyn.training.module import build_optimizer

TOKENIZER_DIR, ENCODER_DIR, METRICS_FILE = "tokenizer", "text_encoder", "metrics.json"


def load_tokenizer(cfg: DictConfig, run_dir: Path, texts: list[str]):
    """The model's tokenizer; from scratch, the one this run trained on its reports (made once, kept in
    `run_dir/tokenizer/` so a resumed run tokenizes exactly as before)."""
    from transformers import AutoTokenizer

    from medsyn.conditioning.tiny_bert import save_tokenizer, train_tokenizer

    if cfg.model.name:
        try:
            return AutoTokenizer.from_pretrained(
                str(cfg.model.name), trust_remote_code=bool(cfg.model.trust_remote_code)
            )
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name={cfg.model.name}: cannot load its tokenizer ({err})") from err
    saved = run_dir / TOKENIZER_DIR
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    tokenizer = train_tokenizer(texts, vocab_size=int(cfg.model.scratch.vocab_size),
                                model_max_length=int(cfg.data.max_length))  # fmt: skip
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        with atomic_dir(saved, overwrite=True) as tmp:
            save_tokenizer(tokenizer, tmp)
    return tokenizer


def extend_positions(model, positions: int) -> None:
    """Give `model` `positions` position embeddings: the learned ones, then copies of them repeated (as
    long-document models initialise theirs), so reports longer than the pre-training length fit."""
    base = model.base_model.embeddings
    old = base.position_embeddings.weight.data
    if positions <= old.shape[0]:
        return
    table = torch.nn.Embedding(positions, old.shape[1]).to(old.device, old.dtype)
    with torch.no_grad():
        for start in range(0, positions, old.shape[0]):
            n = min(old.shape[0], positions - start)
            table.weight[start : start + n] = old[:n]
    base.position_embeddings = table
    base.register_buffer(
        "position_ids", torch.arange(positions, device=old.device).expand((1, -1)), persistent=False
    )
    if hasattr(base, "token_type_ids"):
        base.register_buffer("token_type_ids", torch.zeros((1, positions), dtype=torch.long, device=old.device),
                             persistent=False)  # fmt: skip
    model.config.max_position_embeddings = positions


def build_pretraining_model(cfg: DictConfig, vocab_size: int):
    """A model with MLM and pairing heads: `model.name` with its heads (new heads where it has none), or
    a BERT of `model.scratch` sizes; position embeddings extended to `model.max_position_embeddings`."""
    from transformers import AutoConfig, AutoModelForPreTraining

    from medsyn.conditioning.tiny_bert import tiny_bert_config

    if cfg.model.name:
        name, trust = str(cfg.model.name), bool(cfg.model.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "newly initialized heads": on purpose
                model = AutoModelForPreTraining.from_pretrained(name, config=config, trust_remote_code=trust)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                f"model.name={name}: cannot load it with masked-LM and pairing heads ({err})"
            ) from err
        if not hasattr(model, "cls") or not hasattr(model.cls, "seq_relationship"):
            raise ConfigError(f"model.name={name}: a {type(model).__name__} has no paired-section head; "
                              "expected a BERT-family model")  # fmt: skip
    else:
        from transformers import BertForPreTraining

        scratch = to_container(cfg.model.scratch)
        positions = max(int(cfg.data.max_length), 64)
        config = tiny_bert_config(vocab_size, scratch["hidden_size"], scratch["num_layers"], scratch["num_heads"],
                                  scratch.get("intermediate_size"), positions)  # fmt: skip
        torch.manual_seed(int(cfg.seed))
        model = BertForPreTraining(config)
    if cfg.model.max_position_embeddings:
        extend_positions(model, int(cfg.model.max_position_embeddings))
    if model.config.max_position_embeddings < int(cfg.data.max_length):
        raise ConfigError(f"data.max_length={cfg.data.max_length}: the model has only "
                          f"{model.config.max_position_embeddings} positions; set model.max_position_embeddings")  # fmt: skip
    return model


class TextPretrainModule(pl.LightningModule):
    """MLM + paired-section fine-tuning of a text encoder (`transformers` pre-training model)."""

    def __init__(self, config: dict[str, Any], vocab_size: int) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "vocab_size": vocab_size})
        self.config = config
        self.model = build_pretraining_model(OmegaConf.create(config), vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return self.model(**inputs, labels=batch["labels"], next_sentence_label=batch["paired_label"])

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        out = self(batch)
        counts = accuracy_counts(out, batch)
        n = batch["input_ids"].shape[0]
        self.log(
            f"{split}/loss", out.loss, prog_bar=split == "train", batch_size=n, sync_dist=split != "train"
        )
        for task, (correct, total) in counts.items():
            if total:
                self.log(
                    f"{split}/{task}_accuracy", correct / total, batch_size=total, sync_dist=split != "train"
                )
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self):
        return build_optimizer(self.model.parameters(), **self.config["optim"])


def accuracy_counts(out, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
    """(correct, total) of the masked tokens (`mlm`) and of the pairing labels (`pairing`) in a batch."""
    masked = batch["labels"] != -100
    predicted = out.prediction_logits.argmax(-1)
    mlm = float((predicted[masked] == batch["labels"][masked]).sum())
    pairing = float((out.seq_relationship_logits.argmax(-1) == batch["paired_label"]).sum())
    return {"mlm": (mlm, int(masked.sum())), "pairing": (pairing, int(batch["paired_label"].numel()))}


@torch.no_grad()
def held_out_metrics(module: TextPretrainModule, loader) -> dict[str, float | int]:
    """`mlm_accuracy` and `pairing_accuracy` over a whole loader (the held-out split), in eval mode."""
    was_training = module.training
    module.eval()
    totals = {"mlm": [0.0, 0], "pairing": [0.0, 0]}
    for batch in loader:
        batch = {k: v.to(module.device) for k, v in batch.items()}
        for task, (correct, total) in accuracy_counts(module(batch), batch).items():
            totals[task][0] += correct
            totals[task][1] += total
    module.train(was_training)
    return {
        "mlm_accuracy": totals["mlm"][0] / max(totals["mlm"][1], 1),
        "pairing_accuracy": totals["pairing"][0] / max(totals["pairing"][1], 1),
        "masked_tokens": totals["mlm"][1],
        "reports": totals["pairing"][1],
    }


def export_encoder(module: TextPretrainModule, tokenizer, out_dir: Path) -> Path:
    """Write the encoder without its heads, with its tokenizer, as a transformers directory (safetensors)."""
    from medsyn.conditioning.tiny_bert import save_tokenizer

    with atomic_dir(out_dir, overwrite=True) as tmp:
        module.model.base_model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        for path in tmp.iterdir():  # safetensors writes its file with mode 0600
            if path.is_file():
                usual_mode(path)
    return out_dir


def ensure_reports(cfg: DictConfig) -> Path:
    """`data.root` as it is, or, with `data.phantoms` and nothing there yet, the reports of that many
    phantom subjects written there as a CSV (reports only: drawing their volumes is not needed)."""
    from medsyn.data.phantom import write_reports

    root, spec = Path(cfg.data.root), cfg.data.phantoms
    if not spec:
        raise DataError(f"data.root={root}: no manifest.csv with reports there; point it at a prepared cache, "
                        "a phantom folder or a CSV with id, findings, impression, or set data.phantoms")  # fmt: skip
    spec = to_container(spec)
    unknown = set(spec) - {"n", "seed"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in data.phantoms; valid keys: n, seed")
    n = int(spec.get("n", 1000))
    print(f"medsyn: writing the reports of {n} phantom subjects to {root / 'manifest.csv'}")
    return write_reports(root / "manifest.csv", n, seed=int(spec.get("seed", 0)))


def train_text(cfg: DictConfig) -> Path:
    """Run (or resume) `train.py text`; returns the run directory with text_encoder/ and metrics.json."""
    from medsyn.data.reports import ReportDataModule, read_reports
    from medsyn.training.run import open_run, plain_trainer, start_run

    cfg, ckpt_path = open_run(cfg)
    run_dir, config = Path(cfg.run_dir), to_container(cfg)
    root = Path(cfg.data.root)
    if not (root.is_file() or (root / "manifest.csv").is_file()):
        root = ensure_reports(cfg)
    rows = read_reports(root)
    texts = [f"{r['findings']} {r['impression']}" for r in rows if r["split"] == "train"]
    if not texts:
        raise DataError(f"{root}: no training reports (split train)")
    tokenizer = load_tokenizer(cfg, run_dir, texts)
    trainer = plain_trainer(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = TextPretrainModule(config, len(tokenizer))
    datamodule = ReportDataModule(root, tokenizer, int(cfg.data.batch_size), int(cfg.data.num_workers),
                                  int(cfg.seed), int(cfg.data.max_length), **config["objective"])  # fmt: skip
    datamodule.setup()
    start_run(cfg, trainer, module, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        split = datamodule.held_out_split()
        metrics = held_out_metrics(module, datamodule.val_dataloader())
        metrics = {
            **metrics,
            "split": split,
            "chance_pairing_accuracy": 0.5,
            "global_step": trainer.global_step,
        }
        export_encoder(module, tokenizer, run_dir / ENCODER_DIR)
        write_json(run_dir / METRICS_FILE, metrics)
        print(f"medsyn: held-out ({split}) MLM accuracy {metrics['mlm_accuracy']:.3f}, pairing accuracy "
              f"{metrics['pairing_accuracy']:.3f} (chance 0.5) -> {run_dir / METRICS_FILE}")  # fmt: skip
    return run_dir
