"""Assemble and run a training job from a run config: data, module, callbacks, logger, Trainer."""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.io import write_text
from medsyn.tracking import wandb_offline
from medsyn.training.callbacks import EMA, ExportWeights, Preview, SaveLastOnEnd, Throughput
from medsyn.training.checkpoints import (
    LAST,
    RunCheckpointIO,
    RunCheckpoints,
    checkpoint_files,
    make_latest,
    newest_checkpoint,
    remove_checkpoint,
    remove_leftovers,
    verify,
)
from medsyn.training.config import accumulation
from medsyn.training.module import DiffusionModule
from medsyn.weights import WEIGHTS_FILE

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
    allowed = {"n", "size", "spacing_mm", "seed", "out", "workers", "lr_factor"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in data.phantoms; valid keys: {', '.join(sorted(allowed))}"
        )
    size = int(spec.get("size", 128))
    spacing = float(spec.get("spacing_mm", 256.0 / size))
    source = Path(spec.get("out") or root.parent / "phantoms")
    workers = int(spec.get("workers", 1))
    lr_factor = int(spec.get("lr_factor", 4))
    if lr_factor < 1 or size % lr_factor:
        raise ConfigError(f"data.phantoms.lr_factor={lr_factor}: expected a positive divisor of size={size}")
    if not (source / "manifest.csv").is_file():
        print(f"medsyn: generating {spec.get('n', 32)} phantoms of {size}^3 at {spacing:g} mm in {source}")
        write_dataset(source, n=int(spec.get("n", 32)), size=size, spacing_mm=spacing, seed=int(spec.get("seed", 0)),
                      workers=workers)  # fmt: skip
    print(f"medsyn: preparing the cache in {root}")
    options = PrepareOptions(preprocess=PreprocessConfig(size=size, spacing_mm=spacing), workers=workers,
                             lr_factor=lr_factor)  # fmt: skip
    result = prepare(source / "manifest.csv", root, options)
    if result.all_failed:
        raise DataError(f"{root}: no phantom could be prepared; see {root / 'failed.csv'}")
    return root


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """`cfg` with its local paths made absolute: `run_dir`, `data.root`, `data.phantoms.out`, and
    `text.model`, `keypatches.align` and `keypatches.codebook` when they name local directories. The
    run's config.yaml and weights then name what the run used, wherever they are read from."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = _absolute(cfg.run_dir)
    cfg.data.root = _absolute(cfg.data.root)
    if cfg.data.get("phantoms") and cfg.data.phantoms.get("out"):
        cfg.data.phantoms.out = _absolute(cfg.data.phantoms.out)
    if cfg.get("text") is not None and cfg.text.get("model"):
        model = str(cfg.text.model)
        if Path(model).expanduser().exists():
            cfg.text.model = _absolute(model)
    for key in ("align", "codebook"):
        if cfg.get("keypatches") is not None and cfg.keypatches.get(key):
            if Path(str(cfg.keypatches[key])).expanduser().exists():
                cfg.keypatches[key] = _absolute(cfg.keypatches[key])
    return cfg


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, per `resume` (auto / never / a path); refuses to clobber a run.

    auto: the newest readable checkpoint of the run by global step (broken ones are passed over with a
    line saying so); nothing is written here.
    """
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    resume = str(cfg.resume)
    if resume == "auto":
        found, problems = newest_checkpoint(ckpt_dir)
        if found is None and problems:
            raise DataError(
                f"{ckpt_dir}: no readable checkpoint to continue from ({'; '.join(problems)}); move the broken "
                "files away to start afresh, or set resume=never overwrite=true"
            )
        if problems and _rank_zero():
            print(f"medsyn: {'; '.join(problems)}; resuming from {found} (step {verify(found)}) instead")
        return None if found is None else str(found)
    if resume == "never":
        if checkpoint_files(ckpt_dir) and not cfg.overwrite:
            raise ConfigError(
                f"run_dir={cfg.run_dir} already holds checkpoints; continue it with resume=auto, "
                "or start afresh with resume=never overwrite=true (which deletes them)"
            )
        return None
    if not Path(resume).is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    verify(resume)  # a DataError naming the file when it is damaged
    return resume


def check_resumable(cfg: DictConfig, ckpt_path: str, module: DiffusionModule) -> None:
    """Refuse settings a resumed run would not use: another stage, seed or model than its checkpoint's.
    (optim settings may change: the module applies them.)"""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)  # verified: data only
    saved = (ckpt.get("hyper_parameters") or {}).get("config") or {}
    how = (
        "drop the change to continue this run, or train a new one (another run_dir, or resume=never "
        "overwrite=true)"
    )
    for key, why in (
        ("stage", "a run keeps its stage"),
        ("seed", "its random state continues from the checkpoint"),
    ):
        if key in saved and saved[key] != cfg[key]:
            raise ConfigError(
                f"{key}={cfg[key]!r}: {ckpt_path} was trained with {key}={saved[key]!r} ({why}); {how}"
            )
    state, expected = ckpt.get("state_dict") or {}, module.state_dict()
    differ = sorted(set(state) ^ set(expected)) or [
        k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if differ:
        raise ConfigError(
            f"model={to_container(cfg.model)}: {ckpt_path} holds another model (first difference: {differ[0]}; "
            f"it was trained with model={saved.get('model')}); {how}"
        )


def tidy_run_dir(run_dir: Path, cfg: DictConfig, ckpt_path: str | None) -> None:
    """Before a run writes: remove the temporary files of a killed run; with resume=never overwrite=true
    the earlier run's checkpoints and weights; else make `last.ckpt` the checkpoint resumed from and
    remove the later ones it replaces and the step checkpoints beyond `checkpoint.keep`."""
    ckpt_dir = run_dir / "checkpoints"
    remove_leftovers(ckpt_dir)
    for folder in (run_dir, run_dir / "previews"):  # atomic_path's temporary names: .NAME.XXXX.tmp.EXT
        for tmp in folder.glob(".*.tmp*") if folder.is_dir() else []:
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
    if str(cfg.resume) == "never" and cfg.overwrite:
        old = checkpoint_files(ckpt_dir) + [p for p in (run_dir / WEIGHTS_FILE,) if p.exists()]
        for path in old:
            remove_checkpoint(path)  # and its checksum record
        if old:
            print(f"medsyn: overwrite=true: deleted the earlier run's {', '.join(p.name for p in old)}")
    elif ckpt_path is not None and Path(ckpt_path).parent.resolve() == ckpt_dir.resolve():
        later = make_latest(ckpt_path, int(cfg.checkpoint.keep))
        if later and str(cfg.resume) != "auto":  # (auto: only broken ones, already named)
            names = ", ".join(p.name for p in later)
            print(
                f"medsyn: resume={ckpt_path}: removed this run's later checkpoints ({names}), which it replaces"
            )


def _rank_zero() -> bool:
    return all(int(os.environ.get(k, "0")) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


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
            offline = wandb_offline()
        return WandbLogger(
            project=cfg.logger.project,
            name=cfg.logger.name or run_dir.name,
            entity=cfg.logger.entity,
            save_dir=str(run_dir),
            offline=bool(offline),
        )
    raise ConfigError(f"logger.kind={kind!r}; expected wandb, csv, tensorboard or none")


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
QUIET_WARNINGS = (
    r".*dataloader is not resumable.*",  # ResumableSampler skips what an interrupted run consumed
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen text encoder, on purpose
    r"Checkpoint directory .* exists and is not empty.*",  # resume=auto continues in the same run_dir
    r".*callbacks used to create the checkpoint need to be provided.*",  # ModelCheckpoint's, in old runs
)


def build_trainer(cfg: DictConfig, callbacks: list, logger: Any) -> pl.Trainer:
    """Lightning's Trainer from the `trainer` section; settings Lightning refuses are a ConfigError."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer_args = to_container(cfg.trainer)
    if trainer_args.get("strategy") == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # gradients live in DDP's buckets instead of beside them: one gradient-sized buffer less per GPU
        trainer_args["strategy"] = DDPStrategy(gradient_as_bucket_view=True)
    plugins = trainer_args.pop("plugins", None) or []
    plugins = [
        *(plugins if isinstance(plugins, list) else [plugins]),
        RunCheckpointIO(int(cfg.checkpoint.keep)),
    ]
    try:
        return pl.Trainer(
            **trainer_args,
            default_root_dir=str(cfg.run_dir),
            logger=logger,
            callbacks=callbacks,
            plugins=plugins,
            use_distributed_sampler=False,  # ResumableSampler splits across ranks itself
            enable_checkpointing=True,
        )
    except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
        message = " ".join(str(err).split())
        named = [k for k in cfg.trainer if f"{k}=" in message] or [
            k for k in cfg.trainer if re.search(rf"\b{re.escape(k)}\b", message, re.IGNORECASE)
        ]
        where = f"trainer.{named[0]}={cfg.trainer[named[0]]!r}" if named else "trainer"
        raise ConfigError(f"{where}: Lightning refuses it: {message}") from err


def plain_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    """The Trainer of a stage without EMA, export or previews (text, align): the last and step
    checkpoints, throughput, a progress bar unless disabled, and the logger with a learning-rate monitor."""
    every = int(cfg.checkpoint.every_n_steps)
    callbacks: list = [SaveLastOnEnd(run_dir / "checkpoints" / LAST), Throughput(),
                       RunCheckpoints(run_dir / "checkpoints", every)]  # fmt: skip
    if cfg.trainer.get("enable_progress_bar", True) is not False:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    logger = build_logger(cfg)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return build_trainer(cfg, callbacks, logger)


def open_run(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """For every stage: silence Lightning warnings that do not apply, make the config's paths absolute and
    find the checkpoint to resume from (nothing is written yet). Returns (config, checkpoint or None)."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    cfg = absolute_paths(cfg)
    return cfg, resolve_resume(cfg)


def start_run(
    cfg: DictConfig, trainer: pl.Trainer, module: pl.LightningModule, ckpt_path: str | None
) -> None:
    """The last checks and writes before `fit`, for every stage: a resumed checkpoint must match the run,
    gradient accumulation reaches `effective_batch_size`, and (rank zero) the run directory is tidied and
    gets its config.yaml."""
    if ckpt_path is not None:
        check_resumable(cfg, ckpt_path, module)
    trainer.accumulate_grad_batches = accumulation(
        int(cfg.effective_batch_size), int(cfg.data.batch_size), trainer.world_size
    )
    if trainer.is_global_zero:
        run_dir = Path(cfg.run_dir)
        tidy_run_dir(run_dir, cfg, ckpt_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))


def train(
    cfg: DictConfig, build_data: Callable[[DictConfig, Path], pl.LightningDataModule] = build_datamodule
) -> Path:
    """Run (or resume) the training job `cfg`; returns the run directory.

    Everything that can refuse the job (settings, checkpoints, data) does so before the run directory is
    written to. `build_data(cfg, root)` makes the data a stage learns (`build_datamodule`: the CT cache's;
    the radiograph baseline passes its own, `medsyn.training.cxr_diffusion`).
    """
    cfg, ckpt_path = open_run(cfg)
    run_dir, config = Path(cfg.run_dir), to_container(cfg)

    ema = None
    if cfg.ema.decay is not None:
        ema = EMA(**config["ema"])
    every = int(cfg.checkpoint.every_n_steps)
    exporter = ExportWeights(run_dir, config, every, ema)
    callbacks: list = [SaveLastOnEnd(run_dir / "checkpoints" / LAST)]
    callbacks += [cb for cb in (ema,) if cb is not None]
    callbacks += [exporter, Throughput(), RunCheckpoints(run_dir / "checkpoints", every)]
    if cfg.trainer.get("enable_progress_bar", True) is not False:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    preview = None
    if cfg.preview.every_n_steps:
        preview = Preview(run_dir, **config["preview"], ema=ema)
        callbacks.append(preview)
    logger = build_logger(cfg)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = build_trainer(cfg, callbacks, logger)

    root = ensure_data(cfg)
    if preview is not None:
        preview.spacing = _cache_spacing(root, cfg.data.resolution)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = DiffusionModule(config)
    datamodule = build_data(cfg, root)
    start_run(cfg, trainer, module, ckpt_path)
    if trainer.is_global_zero:
        if logger:
            logger.log_hyperparams({**config, "parameters": module.count_parameters(),
                                    "accumulate_grad_batches": trainer.accumulate_grad_batches,
                                    "world_size": trainer.world_size})  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    exporter.finish(trainer, module)
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
