"""`train.py align`: train the report-image dual encoder (`medsyn.alignment`) on a prepared cache.

`data.root` is a CT cache or a radiograph cache (`medsyn.alignment.data.PairCache` tells which). Batches
are the base stage's layout: the CT cache's base-resolution 4-channel volumes (`BaseDataModule`), or the
radiographs (`RadiographDataModule`, (B, 1, H, W)), with their reports; the config's `model.spatial_dims`
and `model.in_channels` must match them (3 and 4, the defaults, for CT; 2 and 1 for radiographs).
The loss is `loss.global_weight` x the global InfoNCE plus `loss.local_weight` x the word-patch InfoNCE;
negatives are the other pairs of the batch on each device (so `data.batch_size`, not
`effective_batch_size`, sets how many a pair is contrasted with). Held-out metrics keep their names
(`report_to_volume_top1`, ...) for radiographs too.

The run directory follows the other stages: config.yaml, checkpoints/ (exact resume: the global random
state, which dropout draws from, is saved in each checkpoint), logs, `model.safetensors` (the weights
and the run config; a frozen text encoder is left out and reloads from `text.model`) and `metrics.json`
with retrieval accuracy on the test split (val when the cache has no test subjects).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from medsyn.alignment.data import PairCache
from medsyn.alignment.losses import global_contrastive_loss, local_contrastive_loss, word_patch_scores
from medsyn.alignment.metrics import chance_accuracy, report_positives, retrieval_metrics, similarity_gap
from medsyn.alignment.model import build_alignment_model
from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.io import write_json
from medsyn.training.module import NonFiniteLossError, ResumableModule, build_optimizer
from medsyn.weights import WEIGHTS_FILE, export_weights

METRICS_FILE = "metrics.json"


class AlignModule(ResumableModule):
    """Contrastive training of the alignment model an align run config describes."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": dict(config)})
        self.model = build_alignment_model(config)
        self.loss_cfg = dict(config["loss"])
        self.optim_cfg = dict(config.get("optim") or {})

    def losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-pair losses (B,) of a batch `{"x": (B, C, *S), "text": list[str]}`: `global`, `local`
        (each only when its weight is not zero) and their weighted sum `loss`."""
        cfg = self.loss_cfg
        volumes = self.model.encode_volumes(batch["x"])
        reports = self.model.encode_reports(batch["text"])
        global_scale, local_scale = self.model.logit_scales()
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(batch["x"].shape[0], device=self.device)
        if cfg["global_weight"]:
            out["global"] = global_contrastive_loss(reports.global_, volumes.global_, global_scale)
            total = total + cfg["global_weight"] * out["global"]
        if cfg["local_weight"]:
            out["local"] = local_contrastive_loss(reports.words, reports.word_mask, volumes.patches, local_scale,
                                                  cfg["local_pool"], cfg["softmax_temperature"])  # fmt: skip
            total = total + cfg["local_weight"] * out["local"]
        out["loss"] = total
        return out

    def _step(self, batch: Mapping[str, Any], split: str) -> torch.Tensor:
        losses = {k: v.mean() for k, v in self.losses(batch).items()}
        n = batch["x"].shape[0]
        if split == "train":
            bad = not bool(torch.isfinite(losses["loss"].detach()))
            if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
                raise NonFiniteLossError(
                    f"the training loss is not finite at step {self.global_step} (batch ids "
                    f"{list(batch.get('id', []))}); stopping. The last good checkpoint is left as it was. "
                    "Lower optim.lr or use trainer.precision=32."
                )
            global_scale, local_scale = self.model.logit_scales()
            self.log("train/temperature_global", 1.0 / global_scale.detach(), batch_size=n)
            self.log("train/temperature_local", 1.0 / local_scale.detach(), batch_size=n)
        for key, value in losses.items():
            name = f"{split}/loss" if key == "loss" else f"{split}/{key}_loss"
            self.log(name, value, prog_bar=key == "loss", batch_size=n, sync_dist=split != "train")
        return losses["loss"]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self):
        return build_optimizer([p for p in self.parameters() if p.requires_grad], **self.optim_cfg)

    def exported_state(self) -> dict[str, torch.Tensor]:
        """The weights inference needs: the model's state (a frozen text encoder left out)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}


@torch.no_grad()
def held_out_metrics(module: AlignModule, loader, loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Retrieval over a whole loader (the held-out split), in eval mode.

    Global: report -> volume and volume -> report top-1 / top-5 accuracy by the cosine similarity of the
    global embeddings, and the mean matched vs unmatched similarity; `local_*`: the same retrieval by the
    word-patch scores (report -> volume: `word_patch_scores`' words-to-patches score, volume -> report:
    its patches-to-words score). A retrieved item counts when its report is the same text as the query's.
    """
    was_training = module.training
    module.eval()
    model = module.model
    glob_v, glob_r, patches, words, masks, texts = [], [], [], [], [], []
    for batch in loader:
        v = model.encode_volumes(batch["x"].to(module.device))
        r = model.encode_reports(batch["text"])
        glob_v.append(v.global_)
        glob_r.append(r.global_)
        patches.append(v.patches)
        words.append(r.words)
        masks.append(r.word_mask)
        texts += list(batch["text"])
    module.train(was_training)
    most = max(w.shape[1] for w in words)
    words = torch.cat([torch.nn.functional.pad(w, (0, 0, 0, most - w.shape[1])) for w in words])  # (N, W, D)
    masks = torch.cat([torch.nn.functional.pad(m, (0, most - m.shape[1])) for m in masks])  # (N, W)
    patches = torch.cat(patches)  # (N, P, D)
    positives = report_positives(texts).to(module.device)  # (N, N)
    similarity = torch.cat(glob_r) @ torch.cat(glob_v).T  # (N reports, N volumes)
    to_volume, to_report = [], []
    chunk = max(1, 2**26 // (len(texts) * words.shape[1] * patches.shape[1]))  # (chunk, N, W, P) floats
    for start in range(0, len(texts), chunk):
        part = slice(start, start + chunk)
        a, b = word_patch_scores(
            words[part], masks[part], patches, loss_cfg["local_pool"], loss_cfg["softmax_temperature"]
        )
        to_volume.append(a)
        to_report.append(b)
    return {
        **retrieval_metrics(similarity, positives),
        **similarity_gap(similarity, positives),
        **retrieval_metrics(torch.cat(to_volume), positives, torch.cat(to_report), prefix="local_"),
        "subjects": len(texts),
        "distinct_reports": len({" ".join(t.split()) for t in texts}),
        "chance_top1": chance_accuracy(positives, 1),
        "chance_top5": chance_accuracy(positives, 5),
    }


def check_cache(cfg: DictConfig, data: PairCache) -> None:
    """The cache has training subjects and at least 2 held-out ones (test, else val) to measure retrieval
    on, its images are of the kind the model takes (`model.spatial_dims`, `model.in_channels`), and
    their grid splits into whole patches of `model.patch_size`."""
    import inspect

    import numpy as np

    from medsyn.alignment.model import VolumeEncoder, volume_encoder_config

    root = data.root
    rows = data.rows()
    counts = {split: sum(r["split"] == split for r in rows) for split in ("train", "val", "test")}
    if counts["train"] < 2 or max(counts["test"], counts["val"]) < 2:
        raise DataError(
            f"{root / 'manifest.csv'}: {counts['train']} train, {counts['val']} val and {counts['test']} test "
            "subjects; the alignment needs at least 2 to train on and 2 held out (test, else val)"
        )
    defaults = {k: p.default for k, p in inspect.signature(VolumeEncoder).parameters.items()}
    spec = {**defaults, **volume_encoder_config(to_container(cfg.model))}
    if (spec["spatial_dims"], spec["in_channels"]) != (data.spatial_dims, data.channels):
        raise ConfigError(
            f"model.spatial_dims={spec['spatial_dims']}, model.in_channels={spec['in_channels']}: data.root="
            f"{root} is a {data.kind} cache, whose images have {data.spatial_dims} axes and {data.channels} "
            f"channel(s); set model.spatial_dims={data.spatial_dims} model.in_channels={data.channels}"
        )
    shape = tuple(np.shape(data.load(rows[0]))[1:])
    patch = int(spec["patch_size"])
    if any(n % patch for n in shape):
        raise ConfigError(
            f"model.patch_size={patch}: does not divide the image grid {shape} of the cache at {root}; "
            "choose a divisor of each side"
        )


def train_align(cfg: DictConfig) -> Path:
    """Run (or resume) `train.py align`; returns the run directory with model.safetensors and metrics.json."""
    from medsyn.training.run import ensure_data, open_run, plain_trainer, start_run

    cfg, ckpt_path = open_run(cfg)
    run_dir, config = Path(cfg.run_dir), to_container(cfg)
    data = PairCache.open(ensure_data(cfg))
    check_cache(cfg, data)
    trainer = plain_trainer(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = AlignModule(config)
    datamodule = data.datamodule(int(cfg.data.batch_size), int(cfg.data.num_workers), int(cfg.seed),
                                 str(cfg.data.text))  # fmt: skip
    datamodule.setup()
    start_run(cfg, trainer, module, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        split = "test" if len(datamodule.datasets["test"]) >= 2 else "val"
        export_weights(
            run_dir / WEIGHTS_FILE, module.exported_state(), {**config, "global_step": trainer.global_step}
        )
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        metrics = {"split": split, **held_out_metrics(module, loader, config["loss"]),
                   "global_step": trainer.global_step}  # fmt: skip
        write_json(run_dir / METRICS_FILE, metrics)
        print(
            f"medsyn: held-out ({split}, {metrics['subjects']} subjects) top-1 report->image "
            f"{metrics['report_to_volume_top1']:.3f}, image->report {metrics['volume_to_report_top1']:.3f} "
            f"(chance {metrics['chance_top1']:.3f}) -> {run_dir / METRICS_FILE}"
        )
    return run_dir
