"""Assemble and run a training job from a run config: data, module, callbacks, logger, Trainer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.io import write_text
from medsyn.training.callbacks import EMA, ExportWeights, Preview, SaveLastOnEnd, Throughput
from medsyn.training.config import accumulation
from medsyn.training.module import DiffusionModule

CONFIG_FILE = "config.yaml"


def ensure_data(cfg: DictConfig) -> Path:
    """The prepared cache at `data.root`; generated from phantoms first when `data.phantoms` asks for it."""
    root = Path(cfg.data.root)
    if (root / "manifest.csv").is_file():
        return root
    if not cfg.data.phantoms:
        raise DataError(
            f"data.root={root}: no prepared cache (manifest.csv) there. Run `medsyn prepare --input "
            f"MANIFEST.csv --out {root}` first, or set data.phantoms to generate phantom data."
        )
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
        raise DataError(
            f"data.root={root}: the cache is missing on a non-zero rank; prepare it before launching"
        )
    from medsyn.data.phantom import write_dataset
    from medsyn.data.prepare import PrepareOptions, prepare
    from medsyn.data.preprocess import PreprocessConfig

    spec = to_container(cfg.data.phantoms)
    allowed = {"n", "size", "spacing_mm", "seed", "out", "workers"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in data.phantoms; valid keys: {', '.join(sorted(allowed))}"
        )
    size = int(spec.get("size", 128))
    spacing = float(spec.get("spacing_mm", 256.0 / size))
    source = Path(spec.get("out") or root.parent / "phantoms")
    workers = int(spec.get("workers", 1))
    if not (source / "manifest.csv").is_file():
        print(f"medsyn: generating {spec.get('n', 32)} phantoms of {size}^3 at {spacing:g} mm in {source}")
        write_dataset(source, n=int(spec.get("n", 32)), size=size, spacing_mm=spacing, seed=int(spec.get("seed", 0)),
                      workers=workers)  # fmt: skip
    print(f"medsyn: preparing the cache in {root}")
    options = PrepareOptions(preprocess=PreprocessConfig(size=size, spacing_mm=spacing), workers=workers)
    result = prepare(source / "manifest.csv", root, options)
    if result.all_failed:
        raise DataError(f"{root}: no phantom could be prepared; see {root / 'failed.csv'}")
    return root


def ensure_text_model(cfg: DictConfig, root: Path) -> None:
    """Write the small BERT that `text_bootstrap` asks for, when `text.model` does not exist yet."""
    spec = cfg.get("text_bootstrap")
    if not spec or cfg.get("text") is None or Path(cfg.text.model).exists():
        return
    from medsyn.conditioning import build_tiny_bert
    from medsyn.data.cache import read_cache_manifest
    from medsyn.data.datamodule import report_text

    spec = to_container(spec)
    allowed = {"hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "seed"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in text_bootstrap; valid keys: {', '.join(sorted(allowed))}"
        )
    texts = [report_text(r, cfg.data.text) for r in read_cache_manifest(root) if r["split"] == "train"]
    print(
        f"medsyn: writing a small randomly initialised BERT with a tokenizer of the reports to {cfg.text.model}"
    )
    build_tiny_bert(cfg.text.model, texts, **spec)


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, per `resume` (auto / never / a path); refuses to clobber a run."""
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = str(cfg.resume)
    if resume == "auto":
        return str(last) if last.is_file() else None
    if resume == "never":
        if ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")) and not cfg.overwrite:
            raise ConfigError(
                f"run_dir={cfg.run_dir} already holds checkpoints; continue it with resume=auto, "
                "or start afresh with overwrite=true (the old checkpoints are replaced as the run goes)"
            )
        return None
    if not Path(resume).is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    return resume


def build_logger(cfg: DictConfig) -> Any:
    """W&B by default (offline when no API key is set, to `wandb sync` later), or CSV / TensorBoard."""
    kind = cfg.logger.kind
    run_dir = Path(cfg.run_dir)
    if kind in (None, False, "none"):
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(run_dir, name="logs")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(run_dir, name="tensorboard")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:
            offline = (
                not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in())
                or os.environ.get("WANDB_MODE") == "offline"
            )
        return WandbLogger(
            project=cfg.logger.project,
            name=cfg.logger.name or run_dir.name,
            entity=cfg.logger.entity,
            save_dir=str(run_dir),
            offline=bool(offline),
        )
    raise ConfigError(f"logger.kind={kind!r}; expected wandb, csv, tensorboard or none")


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_datamodule(cfg: DictConfig, root: Path) -> pl.LightningDataModule:
    """The data a model learns: the cache's low-resolution stacks with reports (`data.resolution: lr`),
    or high-resolution crops with the matching low-resolution crop, upsampled as the `lowres`
    conditioner upsamples at sampling (`hr`)."""
    from medsyn.data.datamodule import BaseDataModule, SRDataModule

    common = {"root": root, "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers,
              "seed": cfg.seed, "text": cfg.data.text}  # fmt: skip
    if cfg.data.resolution == "lr":
        return BaseDataModule(**common)
    upsample = cfg.lowres.upsample if cfg.get("lowres") is not None else "nearest"
    return SRDataModule(**common, crop_size=cfg.data.crop_size, upsample=upsample)


# Lightning warnings that do not apply to a medsyn run
_QUIET = (
    r".*dataloader is not resumable.*",  # ResumableSampler skips what an interrupted run consumed
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen text encoder, on purpose
    r"Checkpoint directory .* exists and is not empty.*",  # resume=auto continues in the same run_dir
)


def train(cfg: DictConfig) -> Path:
    """Run (or resume) the training job `cfg`; returns the run directory."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_resume(cfg)
    root = ensure_data(cfg)
    ensure_text_model(cfg, root)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    config = to_container(cfg)
    module = DiffusionModule(config)
    datamodule = build_datamodule(cfg, root)

    ema = None
    if cfg.ema.decay is not None:
        ema = EMA(**config["ema"])
    every = int(cfg.checkpoint.every_n_steps)
    callbacks: list = [SaveLastOnEnd(run_dir / "checkpoints" / "last.ckpt")]
    callbacks += [cb for cb in (ema,) if cb is not None]
    callbacks += [
        ExportWeights(run_dir, config, every, ema),
        Throughput(),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step={step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_last=True,
            save_top_k=int(cfg.checkpoint.keep),
            monitor="step",
            mode="max",
        ),
        TQDMProgressBar(refresh_rate=1),
    ]
    if cfg.preview.every_n_steps:
        callbacks.append(
            Preview(run_dir, **config["preview"], ema=ema, spacing=_cache_spacing(root, cfg.data.resolution))
        )
    logger = build_logger(cfg)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))

    trainer_args = to_container(cfg.trainer)
    if trainer_args.get("strategy") == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # gradients live in DDP's buckets instead of beside them: one gradient-sized buffer less per GPU
        trainer_args["strategy"] = DDPStrategy(gradient_as_bucket_view=True)
    trainer = pl.Trainer(
        **trainer_args,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        use_distributed_sampler=False,  # ResumableSampler splits across ranks itself
        enable_checkpointing=True,
    )
    trainer.accumulate_grad_batches = accumulation(
        int(cfg.effective_batch_size), int(cfg.data.batch_size), trainer.world_size
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
        if logger:
            logger.log_hyperparams({**config, "parameters": module.count_parameters(),
                                    "accumulate_grad_batches": trainer.accumulate_grad_batches,
                                    "world_size": trainer.world_size})  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return run_dir


def _cache_spacing(root: Path, resolution: str) -> tuple[float, float, float]:
    """Voxel spacing of the cache's `resolution` ("lr" or "hr") grid, from the cache manifest."""
    from medsyn.data.cache import read_cache_manifest

    rows = read_cache_manifest(root)
    if not rows:
        return (1.0, 1.0, 1.0)
    hr_spacing = float(rows[0].get("spacing_mm") or 1.0)
    factor = int(rows[0]["size"]) // int(rows[0]["lr_size"]) if resolution == "lr" else 1
    return (hr_spacing * factor,) * 3
