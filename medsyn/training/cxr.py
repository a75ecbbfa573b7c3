"""`train.py cxr`: the report-to-radiograph language model (the second seed paper's section 2.2, "Image
Synthesis") on a radiograph cache.

Each subject becomes one token sequence (`medsyn.radiograph.sequence`): the instruction, its report, the
VQ codes of the keypatches its report retrieves from a 2D alignment codebook (its own patches excluded,
so nothing of its image leaks into its condition) and the VQ codes of its image; the loss is the causal
LM's cross-entropy on the image tokens only. With probability `sequence.ucg_rate` a training sequence
has an empty report and no keypatches (condition dropout), for classifier-free guidance at sampling;
the draw is seeded by the resumable sampler's draw id, so a resumed run sees the same sequences.

Everything the images and clues give is computed once at setup and kept in `run_dir/tokens/` (keyed by
the VQ-GAN's, the alignment run's and the codebook's sha256 and by the cache's files), so a training step
runs the language model alone.

The run directory follows the other stages: config.yaml, checkpoints/ (exact resume), logs,
`model.safetensors` (the LM; its metadata the run config, the LM's transformers config and the token
layout), `tokenizer/`, and `metrics.json` with the held-out image-token loss and perplexity (conditional
and unconditional) beside the perplexities of a uniform and of a unigram code model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from medsyn.config import to_container
from medsyn.data.datamodule import CacheDataModule, report_text, split_key
from medsyn.errors import ConfigError, DataError
from medsyn.generation.cxr import KeypatchClues, load_vqgan, module_device
from medsyn.io import atomic_path, usual_mode, write_json
from medsyn.radiograph.cache import load_image, read_radiograph_manifest
from medsyn.radiograph.lm import (
    TOKENIZER_DIR,
    build_lm,
    lm_config,
    lm_positions,
    load_tokenizer,
    save_tokenizer,
)
from medsyn.radiograph.sequence import IGNORE, TokenLayout, build_layout, collate, report_ids
from medsyn.training.module import NonFiniteLossError, ResumableModule, build_optimizer
from medsyn.weights import WEIGHTS_FILE, export_weights

METRICS_FILE, TOKENS_DIR = "metrics.json", "tokens"


# ---- pre-tokenization --------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _remove_stale(path: Path) -> None:
    """Remove the token caches of earlier settings beside `path` (same kind, another key)."""
    kind = path.name.split("-", 1)[0]
    for old in path.parent.glob(f"{kind}-*"):
        if old != path and old.is_file():
            old.unlink()


def _files_key(rows: Sequence[dict]) -> list:
    """What identifies the cache's images: id, file, size and modification time of each."""
    out = []
    for row in rows:
        stat = os.stat(row["image"])
        out.append([row["id"], os.path.basename(row["image"]), stat.st_size, stat.st_mtime_ns])
    return out


@torch.no_grad()
def image_codes(
    rows: Sequence[dict], vqgan: Any, run_dir: Path, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """VQ codes (h, w) of each row's image, by subject id; read from `run_dir/tokens/` when computed before
    with the same VQ-GAN (sha256) and image files, else computed and stored there."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = _digest(["images", str(vqgan.sha256), _files_key(rows)])[:20]
    path = run_dir / TOKENS_DIR / f"images-{key}.safetensors"
    ids = [row["id"] for row in rows]
    if path.is_file():
        try:
            codes = load_file(str(path))["codes"].long()
            if len(codes) == len(ids):
                return dict(zip(ids, codes, strict=True))
        except (SafetensorError, OSError, KeyError):
            pass  # recomputed below
    device = module_device(vqgan)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [load_image(row) for row in chunk]
        for row, image in zip(chunk, images, strict=True):
            if image.shape[-1] != int(vqgan.image_size) or image.shape[-2] != int(vqgan.image_size):
                raise DataError(f"{row['image']}: a {image.shape[-2]}x{image.shape[-1]} image, but the VQ-GAN "
                                f"codes {vqgan.image_size}^2 images; use a cache of that size")  # fmt: skip
        x = torch.from_numpy(np.stack(images)).to(device)  # (B, 1, S, S)
        out.append(vqgan.encode(x).long().cpu())
    codes = torch.cat(out)  # (N, h, w)
    with atomic_path(path) as tmp:
        save_file({"codes": codes.to(torch.int32).contiguous()}, str(tmp), metadata={"ids": json.dumps(ids)})
        usual_mode(tmp)
    _remove_stale(path)
    return dict(zip(ids, codes, strict=True))


def subject_clues(
    rows: Sequence[dict], texts: Sequence[str], clues: KeypatchClues, run_dir: Path
) -> dict[str, list]:
    """Per subject id, the codebook indices of the keypatches its report retrieves (none of its own), with
    their words; read from `run_dir/tokens/` when retrieved before with the same align run, codebook,
    settings and reports, else retrieved and stored there."""
    sources = {k: v["sha256"] for k, v in clues.provenance().items()}
    key = _digest(
        ["keypatches", sources, clues.k3, clues.max_keypatches, [r["id"] for r in rows], list(texts)]
    )[:20]
    path = run_dir / TOKENS_DIR / f"keypatches-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["subjects"]
        except (OSError, ValueError, KeyError):
            pass
    subjects = {}
    for row, text in zip(rows, texts, strict=True):
        found = clues.retrieve(text, exclude_subject=row["id"])
        subjects[row["id"]] = [[c.index, c.word, c.score, c.subject] for c in found]
    write_json(path, {"sources": sources, "k3": clues.k3, "max_keypatches": clues.max_keypatches,
                      "subjects": subjects})  # fmt: skip
    _remove_stale(path)
    return subjects


class TokenDataset(Dataset):
    """Training sequences of subjects: items {id, report (token ids), keypatches ((K, hk, wk) codes or
    None), codes ((h, w) image codes)}. A training draw (a `(index, draw)` key of the resumable sampler)
    drops the condition with probability `ucg_rate`, seeded by (seed, draw); `unconditional` drops it always."""

    def __init__(self, items: list[dict], layout: TokenLayout, ucg_rate: float = 0.0, seed: int = 0,
                 unconditional: bool = False) -> None:  # fmt: skip
        self.items, self.layout, self.ucg_rate, self.seed = items, layout, float(ucg_rate), int(seed)
        self.unconditional = unconditional

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, draw = split_key(key)
        item = self.items[index]
        drop = self.unconditional
        if draw is not None and self.ucg_rate > 0:
            drop = drop or np.random.default_rng((self.seed, 7, draw)).random() < self.ucg_rate
        report, keypatches = ([], None) if drop else (item["report"], item["keypatches"])
        input_ids, labels = self.layout.sequence(report, keypatches, item["codes"])
        return {"input_ids": input_ids, "labels": labels, "id": item["id"]}


class CXRDataModule(CacheDataModule):
    """The radiograph cache's subjects as token sequences (right-padded batches of input_ids,
    attention_mask, position_ids, labels (B, L) and id)."""

    def __init__(self, root, items: Mapping[str, dict], layout: TokenLayout, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, ucg_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__(root, batch_size, num_workers, seed)
        self.items, self.layout, self.ucg_rate = items, layout, ucg_rate
        self.collate_fn = partial(collate, pad_id=layout.vocab.pad, side="right")

    def read_rows(self) -> list[dict]:
        return read_radiograph_manifest(self.root)

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        items = [self.items[r["id"]] for r in rows]
        return TokenDataset(items, self.layout, self.ucg_rate if split == "train" else 0.0, self.seed)

    def held_out_split(self) -> str:
        return "test" if len(self.datasets["test"]) else "val"

    def held_out_loader(self, unconditional: bool = False) -> DataLoader:
        """The held-out split (test, else val) in order; `unconditional`: every condition dropped."""
        dataset = self.datasets[self.held_out_split()]
        dataset = TokenDataset(dataset.items, self.layout, 0.0, self.seed, unconditional=unconditional)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn)


# ---- the model ---------------------------------------------------------------------------------------
def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (B, L-1) of logits (B, L, V) against labels (B, L) (IGNORE: no loss, 0)
    and the mask (B, L-1) of the tokens that count."""
    target = labels[:, 1:]
    mask = target != IGNORE
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target.clamp(min=0), reduction="none")
    return loss * mask, mask


class CXRModule(ResumableModule):
    """Causal-LM training of the `model` section on token sequences, the loss on the image tokens."""

    def __init__(self, config: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": dict(config), "layout": dict(layout)})
        self.layout = TokenLayout.from_dict(layout)
        self.model = build_lm(config["model"], self.layout.vocab, int(config["seed"]))
        self.optim_cfg = dict(config.get("optim") or {})

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Logits (B, L, V) of a collated batch."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False).logits  # fmt: skip

    def losses(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-sequence mean loss (B,) over its labelled tokens (the image codes and <|/image|>)."""
        loss, mask = token_losses(self(batch), batch["labels"])
        return loss.sum(1) / mask.sum(1).clamp(min=1)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.losses(batch).mean()
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(
                f"the training loss is not finite at step {self.global_step} (batch ids {list(batch['id'])}); "
                "stopping. The last good checkpoint is left as it was. Lower optim.lr or use "
                "trainer.precision=32."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.losses(batch).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["id"]), sync_dist=True)
        return loss

    def configure_optimizers(self):
        return build_optimizer(self.model.parameters(), **self.optim_cfg)

    def exported_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}


@torch.no_grad()
def held_out_metrics(module: CXRModule, loader: DataLoader) -> dict[str, float | int]:
    """Mean cross-entropy and perplexity of the image codes (not <|/image|>) over a loader, in eval mode."""
    was_training = module.training
    module.eval()
    vocab = module.layout.vocab
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss, mask = token_losses(module(batch), batch["labels"])
        mask = mask & vocab.is_code(batch["labels"][:, 1:])
        total += float((loss * mask).sum())
        count += int(mask.sum())
    module.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)), "tokens": count}


def unigram_perplexity(
    train: Sequence[torch.Tensor], held_out: Sequence[torch.Tensor], num_codes: int
) -> float:
    """Perplexity on the held-out codes of the training codes' frequencies (add-one smoothed): what a model
    that ignores the report, the keypatches and the image so far would reach."""
    counts = torch.bincount(torch.cat([c.reshape(-1) for c in train]), minlength=num_codes).double() + 1.0
    logp = (counts / counts.sum()).log()
    codes = torch.cat([c.reshape(-1) for c in held_out])
    return float(torch.exp(-logp[codes].mean()))


# ---- the run ------------------------------------------------------------------------------------------
def _encoding_device(cfg: DictConfig) -> str:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


def _check_rows(root: Path, rows: list[dict]) -> None:
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    if counts["train"] < 1 or counts["val"] + counts["test"] < 1:
        raise DataError(f"{root / 'manifest.csv'}: {counts['train']} train, {counts['val']} val and "
                        f"{counts['test']} test subjects; the language model needs training subjects and "
                        "held-out ones")  # fmt: skip


def prepare_tokens(cfg: DictConfig, run_dir: Path, resuming: bool) -> tuple[Any, TokenLayout, dict, Any, Any]:
    """Tokenizer, layout, per-subject items, VQ-GAN and keypatch clues (or None) of the run."""
    root = Path(cfg.data.root)
    rows = read_radiograph_manifest(root)
    _check_rows(root, rows)
    texts = [report_text(r, str(cfg.data.text)) for r in rows]
    device = _encoding_device(cfg)
    vqgan = load_vqgan(cfg.vqgan, device)
    saved = run_dir / TOKENIZER_DIR
    model_cfg = to_container(cfg.model)
    if resuming and not (model_cfg.get("tokenizer") or model_cfg.get("name")) and saved.is_dir():
        tokenizer = load_tokenizer({"tokenizer": str(saved)})
    else:
        # a tokenizer trained here learns the instruction's words too (else they are spelt letter by letter)
        train_texts = [t for r, t in zip(rows, texts, strict=True) if r["split"] == "train"]
        train_texts.append(f"{cfg.sequence.instruction} Report:")
        tokenizer = load_tokenizer(model_cfg, train_texts, int(cfg.model.tokenizer_vocab_size))
    print(f"medsyn: encoding {len(rows)} radiographs with the VQ-GAN at {cfg.vqgan} (once; kept in "
          f"{run_dir / TOKENS_DIR})")  # fmt: skip
    codes = image_codes(rows, vqgan, run_dir)
    clues, found = None, {}
    if cfg.keypatches is not None:
        clues = KeypatchClues.load(to_container(cfg.keypatches), vqgan, device)
        found = subject_clues(rows, texts, clues, run_dir)
    grid = tuple(next(iter(codes.values())).shape)
    layout = build_layout(tokenizer, int(vqgan.num_codes), grid, clues.grid if clues is not None else (0, 0),
                          str(cfg.sequence.instruction), int(cfg.sequence.max_report_tokens),
                          clues.max_keypatches if clues is not None else 0)  # fmt: skip
    items = {}
    for row, text in zip(rows, texts, strict=True):
        chosen = [entry[0] for entry in found.get(row["id"], [])]
        keypatches = clues.codes[chosen] if clues is not None and chosen else None
        items[row["id"]] = {"id": row["id"], "report": report_ids(tokenizer, layout, text),
                            "keypatches": keypatches, "codes": codes[row["id"]]}  # fmt: skip
    return tokenizer, layout, items, vqgan, clues


def train_cxr(cfg: DictConfig) -> Path:
    """Run (or resume) `train.py cxr`; returns the run directory with model.safetensors, tokenizer/ and
    metrics.json."""
    from medsyn.training.run import open_run, plain_trainer, start_run

    cfg, ckpt_path = open_run(cfg)
    cfg.vqgan = os.path.abspath(os.path.expanduser(str(cfg.vqgan)))
    run_dir, config = Path(cfg.run_dir), to_container(cfg)
    trainer = plain_trainer(cfg, run_dir)
    tokenizer, layout, items, vqgan, clues = prepare_tokens(cfg, run_dir, ckpt_path is not None)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = CXRModule(config, layout.to_dict())
    positions = lm_positions(module.model)
    if positions is not None and layout.max_length > positions:
        raise ConfigError(
            f"model: {positions} positions, but a sequence takes up to {layout.max_length} tokens "
            f"({len(layout.prefix)} instruction, {layout.max_report_tokens} report, {layout.max_keypatches} x "
            f"{layout.keypatch_tokens} keypatch, {layout.image_tokens} image tokens and 4 markers); raise "
            "model.config.n_positions or lower sequence.max_report_tokens / keypatches.max_keypatches"
        )
    datamodule = CXRDataModule(cfg.data.root, items, layout, int(cfg.data.batch_size),
                               int(cfg.data.num_workers), int(cfg.seed), float(cfg.sequence.ucg_rate))  # fmt: skip
    datamodule.setup()
    start_run(cfg, trainer, module, ckpt_path)
    if trainer.is_global_zero:
        save_tokenizer(tokenizer, run_dir / TOKENIZER_DIR)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        export_weights(run_dir / WEIGHTS_FILE, module.exported_state(), {
            **config, "global_step": trainer.global_step, "lm_config": lm_config(module.model),
            "layout": layout.to_dict(), "vqgan_sha256": str(vqgan.sha256),
            "keypatch_sources": clues.provenance() if clues is not None else None,
        })  # fmt: skip
        split = datamodule.held_out_split()
        conditional = held_out_metrics(module, datamodule.held_out_loader())
        unconditional = held_out_metrics(module, datamodule.held_out_loader(unconditional=True))
        held_out = [it["codes"] for it in datamodule.datasets[split].items]
        train = [it["codes"] for it in datamodule.datasets["train"].items]
        metrics = {
            "split": split, "subjects": len(held_out), "image_tokens_per_image": layout.image_tokens,
            "image_token_loss": conditional["loss"], "image_token_perplexity": conditional["perplexity"],
            "unconditional_image_token_loss": unconditional["loss"],
            "unconditional_image_token_perplexity": unconditional["perplexity"],
            "unigram_perplexity": unigram_perplexity(train, held_out, layout.vocab.num_codes),
            "uniform_perplexity": float(layout.vocab.num_codes),
            "keypatches": clues is not None, "global_step": trainer.global_step,
        }  # fmt: skip
        write_json(run_dir / METRICS_FILE, metrics)
        print(f"medsyn: held-out ({split}, {len(held_out)} subjects) image-token perplexity "
              f"{metrics['image_token_perplexity']:.2f} (unconditional "
              f"{metrics['unconditional_image_token_perplexity']:.2f}, unigram {metrics['unigram_perplexity']:.2f}, "
              f"uniform {layout.vocab.num_codes}) -> {run_dir / METRICS_FILE}")  # fmt: skip
    return run_dir
