"""Run configuration for `train.py base|sr|text|align`: defaults per stage, YAML file, dotted overrides.

Each section holds the arguments of what it builds: `model` the UNet (a preset and/or its arguments),
`diffusion` `build_denoiser`, `loss` `DiffusionLoss`, `optim` `build_optimizer`, a conditioner section
(`text`, `lowres`) its conditioner, `trainer` Lightning's `Trainer`. For `align` (medsyn.alignment):
`model` the `VolumeEncoder`, `text` the `ReportEncoder`, `projection` the `AlignmentModel`'s shared
space, `loss` the weights and pooling of its two contrastive losses. The defaults below are the one
place defaults live; code passes sections on whole. Keys are checked: a typo in the YAML or on the
command line is an error naming the key and the valid ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from medsyn.config import (
    check_keys,
    constructor_keys,
    load_yaml,
    merge_checked,
    parse_overrides,
    to_container,
)
from medsyn.data.channels import ENCODING, LOBE_ENCODINGS
from medsyn.data.datamodule import TEXT_MODES
from medsyn.errors import ConfigError
from medsyn.generation.model import CONDITIONERS, RESOLUTIONS, conditioner_keys, legacy_keys, upgrade_config
from medsyn.nn.build import model_config
from medsyn.radiograph.cache import ENCODING as RADIOGRAPH_ENCODING

DEFAULT_PREVIEW_PROMPTS = [
    "FINDINGS: The lungs are clear. No pleural effusion. Heart size is normal. IMPRESSION: No acute "
    "cardiopulmonary abnormality.",
    "FINDINGS: Large right pleural effusion with adjacent atelectasis. The heart is enlarged. "
    "IMPRESSION: Large right pleural effusion. Cardiomegaly.",
]

_COMMON: dict[str, Any] = {
    "stage": "base",
    "run_dir": "runs/base",
    "seed": 0,
    "resume": "auto",  # auto: continue from the newest readable checkpoint in run_dir; never; or a path
    "overwrite": False,  # with resume=never: delete the checkpoints a run_dir holds and start afresh
    "encoding": ENCODING,  # the channel convention of the data (a record, see medsyn.data.channels)
    "lobe_encoding": "levels",  # how the network denoises the lobes: levels (4 channels) or bits (6)
    "model": {"preset": "base-700m"},  # UNet preset and/or constructor arguments (medsyn.nn.build)
    "diffusion": {"schedule": "cosine", "schedule_shift": 1.0, "parameterization": "x0"},  # build_denoiser
    "loss": {
        "parameterization": None,
        "channel_weights": None,
        "time_sampling": "stratified",
    },  # DiffusionLoss
    "data": {
        "root": "data/cache",  # a prepared cache (medsyn prepare) with manifest.csv
        "resolution": "lr",  # which of the cache's stacks the model learns: lr (64^3) or hr (256^3)
        "batch_size": 1,  # per device and step; see effective_batch_size
        "num_workers": 4,
        "text": "both",  # findings | impression | both
        "phantoms": None,  # {n, size, seed}: generate and prepare phantoms when data.root has no cache
    },
    "effective_batch_size": 64,  # batch_size x devices x nodes x gradient accumulation
    "optim": {"lr": 1.0e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "eps": 1.0e-8, "warmup_steps": 0},
    "ema": {"decay": 0.9999, "update_every_n_steps": 1, "update_starting_at_step": 0, "device": None},
    "checkpoint": {"every_n_steps": 1000, "keep": 3},  # step checkpoints kept; last.ckpt is the newest
    "logger": {"kind": "wandb", "project": "medsyn", "name": None, "entity": None, "offline": None},
    "preview": {
        "every_n_steps": 1000,
        "prompts": DEFAULT_PREVIEW_PROMPTS,
        "seeds": [0],
        "steps": 25,
        "sampler": "dpmpp-2m",
        "guidance": 3.0,
    },
    "trainer": {
        "max_steps": 40000,
        "accelerator": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "bf16-mixed",
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        "val_check_interval": 1000,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 8,
    },
}

# What each stage changes in the common defaults: the whole difference between the stages is data here.
# A conditioner section (`text`, `lowres`, `keypatches`: medsyn.generation.model.CONDITIONERS) makes the
# model condition on it.
STAGES: dict[str, dict[str, Any]] = {
    "base": {
        "text": {  # TextConditioner arguments
            "model": "microsoft/BiomedVLP-CXR-BERT-specialized",
            "max_length": 192,
            "ucg_rate": 0.1,
            "null_kind": "zero",
        },
        # KeypatchConditioner arguments, e.g. {align: runs/align, codebook: runs/codebook, k3: 3,
        # max_tokens: 32, ucg_rate: 0.1}: keypatch tokens after the report's (off when null)
        "keypatches": None,
    },
    "sr": {
        "model": {"preset": "sr-light"},
        "lowres": {"noise_max": 0.2, "noise_sample": 0.05, "upsample": "nearest"},  # LowResConditioner
        "data": {"resolution": "hr", "crop_size": 64},
        "effective_batch_size": 32,
        "preview": {"guidance": 1.0},
    },
    # the radiograph baseline (medsyn.training.cxr_diffusion): the base stage's model in 2-D on one channel,
    # learning a radiograph cache (`medsyn drr`) whose images are area-downsampled to data.size (null: as cached)
    "cxr-diffusion": {
        "encoding": RADIOGRAPH_ENCODING,
        "channels": ["image"],
        "model": {"preset": "cxr-demo"},
        "text": {
            "model": "microsoft/BiomedVLP-CXR-BERT-specialized",
            "max_length": 192,
            "ucg_rate": 0.1,
            "null_kind": "zero",
        },
        "data": {"root": "data/drr", "size": None},
        "preview": {"every_n_steps": 0},  # previews render volumes; sample.py --cxr RUN draws radiographs
    },
}


# `train.py text`: fine-tune a BERT-family encoder on the reports (masked language modelling of
# `mlm_probability` of the tokens + paired Findings/Impression prediction); the run exports text_encoder/.
TEXT_RUN: dict[str, Any] = {
    "stage": "text",
    "run_dir": "runs/text",
    "seed": 0,
    "resume": "auto",
    "overwrite": False,
    "model": {
        "name": "microsoft/BiomedVLP-CXR-BERT-specialized",  # local directory or hub name; null: from scratch
        "trust_remote_code": False,
        # from scratch: a BertConfig of these sizes, with a WordPiece tokenizer trained on the reports
        "scratch": {
            "hidden_size": 256,
            "num_layers": 4,
            "num_heads": 4,
            "intermediate_size": None,
            "vocab_size": 4000,
        },  # fmt: skip
        "max_position_embeddings": None,  # more positions than the model has: extended, for long reports
    },
    "data": {
        "root": "data/cache",  # a prepared cache, a phantom folder or any manifest.csv with findings/impression
        "phantoms": None,  # {n, seed}: write the reports of n phantom subjects at data.root when it has none
        "max_length": 192,  # tokens of Findings + Impression
        "batch_size": 32,
        "num_workers": 0,
    },
    "objective": {"mlm_probability": 0.15, "swap_probability": 0.5},
    "effective_batch_size": 32,
    "optim": {"lr": 5.0e-5, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1.0e-8, "warmup_steps": 100},
    "checkpoint": {"every_n_steps": 500, "keep": 2},
    "logger": _COMMON["logger"],
    "trainer": {
        **_COMMON["trainer"],
        "max_steps": 5000,
        "val_check_interval": 500,
        "limit_val_batches": None,
    },
}


# `train.py align`: a dual encoder aligning report words with volume patches (the second seed paper's
# fine-grained alignment, in 3D) on the base stage's data; the run exports model.safetensors, metrics.json.
ALIGN_RUN: dict[str, Any] = {
    "stage": "align",
    "run_dir": "runs/align",
    "seed": 0,
    "resume": "auto",
    "overwrite": False,
    "model": {"preset": "align-base"},  # VolumeEncoder preset and/or arguments (medsyn.alignment.model)
    "text": {  # ReportEncoder arguments
        "model": "microsoft/BiomedVLP-CXR-BERT-specialized",  # local directory or hub name
        "max_length": 192,
        "freeze": True,  # false: fine-tune the text encoder with the rest
        "pool": "mean",  # the report's global feature: mean of its word features, or cls
        "trust_remote_code": False,
        "revision": None,
    },
    "projection": {"dim": 256, "temperature": 0.07, "learn_temperature": True},  # the shared space
    "loss": {
        "global_weight": 1.0,  # report-volume InfoNCE
        "local_weight": 1.0,  # word-patch InfoNCE
        "local_pool": "max",  # a word's score over the patches (a patch's over the words): max or softmax
        "softmax_temperature": 0.1,  # of local_pool=softmax
    },
    "data": {
        "root": "data/cache",  # a prepared cache (the base stage's lr stacks and reports)
        "batch_size": 32,  # per device: the pairs each pair is contrasted with
        "num_workers": 4,
        "text": "both",  # findings | impression | both
        "phantoms": None,  # {n, size, seed, ...}: generate and prepare phantoms when data.root has no cache
    },
    "effective_batch_size": 32,  # more than batch_size x devices accumulates gradients, not negatives
    "optim": {"lr": 1.0e-4, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1.0e-8, "warmup_steps": 500},
    "checkpoint": {"every_n_steps": 1000, "keep": 2},
    "logger": _COMMON["logger"],
    "trainer": {**_COMMON["trainer"], "max_steps": 20000},
}


def defaults(stage: str) -> dict[str, Any]:
    """The default run config of a stage ("base", "sr", "text" or "align")."""
    if stage in ("text", "align"):
        return to_container(OmegaConf.create(TEXT_RUN if stage == "text" else ALIGN_RUN))
    if stage == "cxr":  # the report-to-radiograph language model (medsyn.training.cxr)
        from medsyn.training.cxr_config import defaults as cxr_defaults

        return cxr_defaults()
    if stage == "vqgan":  # the radiograph VQ-GAN (medsyn.training.vqgan)
        from medsyn.training.vqgan_config import defaults as vqgan_defaults

        return vqgan_defaults()
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; expected one of {', '.join([*STAGES, 'text', 'align'])}")
    merged = OmegaConf.merge(_COMMON, {"stage": stage, "run_dir": f"runs/{stage}"}, STAGES[stage])
    return to_container(merged)


def _upgraded(cfg: DictConfig, stage: str, where: str) -> DictConfig:
    """`cfg` with keys of earlier medsyn versions moved to where they live now (and a note saying so)."""
    old = legacy_keys(cfg)
    if not old:
        return cfg
    print(
        f"medsyn: {where}: moved keys of an earlier version ({', '.join(old)}); see configs/ for today's names"
    )
    return OmegaConf.create(upgrade_config(to_container(cfg), stage))


def load_run_config(stage: str, path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults of `stage`, then the YAML at `path`, then `dotted.key=value` overrides; all checked."""
    cfg = OmegaConf.create(defaults(stage))
    open_keys = ["model", "text", "keypatches", "trainer", "data.phantoms", "ema.device"]
    if stage == "text":
        open_keys = ["model.scratch", "trainer", "data.phantoms"]
    elif stage == "align":
        open_keys = ["model", "trainer", "data.phantoms"]
    elif stage == "vqgan":
        open_keys = ["model", "discriminator", "trainer"]
    diffusion = stage in STAGES  # base and sr: keys of earlier versions are moved
    if path is not None:
        file_cfg = load_yaml(path)
        if "stage" in file_cfg and file_cfg.stage != stage:
            raise ConfigError(
                f"{path}: is a config for stage '{file_cfg.stage}', but 'train.py {stage}' was run"
            )
        if "text_bootstrap" in file_cfg:
            raise ConfigError(
                f"{path}: text_bootstrap was replaced by `train.py text` (from scratch with model.name=null); "
                "train an encoder with it and set text.model to its run's text_encoder/ (see configs/demo/)"
            )
        file_cfg = _upgraded(file_cfg, stage, str(path)) if diffusion else file_cfg
        cfg = merge_checked(cfg, file_cfg, str(path), open_keys)
        if (
            "model" in file_cfg and stage != "text"
        ):  # a model section in the file replaces the default preset wholesale
            cfg.model = file_cfg.model
    if overrides:
        dotlist = parse_overrides(overrides)
        dotlist = _upgraded(dotlist, stage, "the command-line overrides") if diffusion else dotlist
        cfg = merge_checked(cfg, dotlist, "the command-line overrides", open_keys)
    where = str(path) if path else "the config"
    where = f"{where} with the command-line overrides" if overrides else where
    if stage == "vqgan":
        from medsyn.training.vqgan_config import validate_vqgan

        validate_vqgan(cfg, where)
        return cfg
    if stage == "cxr":
        from medsyn.training.cxr_config import validate_cxr

        validate_cxr(cfg, where)
        return cfg
    {"text": validate_text, "align": validate_align}.get(stage, validate)(cfg, where)
    return cfg


def validate_text(cfg: DictConfig, where: str) -> None:
    """Check a `train.py text` config: the scratch sizes, the objective's rates, the usual numbers."""
    from medsyn.conditioning.tiny_bert import tiny_bert_config

    scratch = to_container(cfg.model.scratch)
    allowed = {"hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"}
    check_keys(scratch, sorted(allowed), f"{where}: model.scratch")
    try:
        tiny_bert_config(**scratch)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: model.scratch: {err}") from err
    _check_trainer(cfg, where)
    for key in ("objective.mlm_probability", "objective.swap_probability"):
        value = OmegaConf.select(cfg, key)
        if not _is_number(value) or not 0.0 < value < 1.0:
            raise ConfigError(f"{where}: {key}={value!r}; expected a number in (0, 1)")
    for key, minimum, what in (*_INTEGERS[:5], ("optim.warmup_steps", 0, "an integer >= 0"),
                               ("data.max_length", 8, "an integer >= 8 (tokens)"),
                               ("data.batch_size", 1, "a positive integer"),
                               ("effective_batch_size", 1, "a positive integer")):  # fmt: skip
        value = OmegaConf.select(cfg, key)
        if value is None and key == "trainer.max_steps":
            continue
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{where}: {key}={value!r}; expected {what}")
    positions = cfg.model.max_position_embeddings
    if positions is not None and (not _is_int(positions) or positions < cfg.data.max_length):
        raise ConfigError(f"{where}: model.max_position_embeddings={positions!r}; expected null or an integer "
                          f">= data.max_length ({cfg.data.max_length})")  # fmt: skip
    for key, low, low_open, what in _NUMBERS:
        value = OmegaConf.select(cfg, key)
        if not _is_number(value) or not math.isfinite(value) or value < low or (low_open and value == low):
            raise ConfigError(f"{where}: {key}={value!r}; expected {what}")
    if str(cfg.resume) not in ("auto", "never") and not str(cfg.resume).endswith(".ckpt"):
        raise ConfigError(f"{where}: resume={cfg.resume!r}; expected auto, never or a path to a .ckpt file")


def _check_trainer(cfg: DictConfig, where: str) -> None:
    """The trainer section holds Lightning Trainer arguments, less those medsyn sets itself."""
    reserved = {"callbacks", "logger", "default_root_dir", "use_distributed_sampler", "accumulate_grad_batches",
                "enable_checkpointing"}  # fmt: skip
    trainer_keys = [k for k in constructor_keys(pl.Trainer) if k not in reserved]
    check_keys(cfg.trainer, trainer_keys, f"{where}: trainer (Lightning Trainer arguments)")


def validate(cfg: DictConfig, where: str) -> None:
    """Check the open sections against the constructors they feed, and a few values."""
    model_config(to_container(cfg.model))  # raises ConfigError naming a bad model key
    for key, cls in CONDITIONERS.items():
        if key in cfg and cfg[key] is not None:
            check_keys(cfg[key], conditioner_keys(cls), f"{where}: {key}")
    _check_trainer(cfg, where)
    encoding = STAGES.get(cfg.stage, {}).get("encoding", ENCODING)  # the stage's data: CT, or radiographs
    if cfg.encoding != encoding:
        raise ConfigError(f"{where}: encoding={cfg.encoding!r}; this medsyn trains on {encoding!r} data "
                          "(the key records the channel convention; it is not a setting)")  # fmt: skip
    if cfg.lobe_encoding not in LOBE_ENCODINGS:
        raise ConfigError(
            f"{where}: lobe_encoding={cfg.lobe_encoding!r}; expected one of {', '.join(LOBE_ENCODINGS)}"
        )
    if cfg.data.text not in TEXT_MODES:
        raise ConfigError(f"{where}: data.text={cfg.data.text!r}; expected one of {', '.join(TEXT_MODES)}")
    if cfg.data.resolution not in RESOLUTIONS:
        raise ConfigError(
            f"{where}: data.resolution={cfg.data.resolution!r}; expected one of {', '.join(RESOLUTIONS)}"
        )
    for key in ("batch_size", "effective_batch_size"):
        value = cfg.data.batch_size if key == "batch_size" else cfg.effective_batch_size
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key}={value!r}; expected a positive integer")
    _check_settings(cfg, where, _INTEGERS, _NUMBERS)
    decay = cfg.ema.decay
    if decay is not None and not 0.0 < float(decay) < 1.0:
        raise ConfigError(f"{where}: ema.decay={decay}; expected a number in (0, 1) or null to disable EMA")


def _check_settings(cfg: DictConfig, where: str, integers: Sequence[tuple], numbers: Sequence[tuple]) -> None:
    """The integer and number settings a stage reads itself, optim.betas and resume."""
    for key, minimum, what in integers:
        value = OmegaConf.select(cfg, key)
        if value is None and key == "trainer.max_steps":
            continue
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{where}: {key}={value!r}; expected {what}")
    for key, low, low_open, what in numbers:
        value = OmegaConf.select(cfg, key)
        if not _is_number(value) or not math.isfinite(value) or value < low or (low_open and value == low):
            raise ConfigError(f"{where}: {key}={value!r}; expected {what}")
    betas = to_container(cfg.optim.betas)
    if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{where}: optim.betas={betas!r}; expected two numbers in [0, 1)")
    if str(cfg.resume) not in ("auto", "never") and not str(cfg.resume).endswith(".ckpt"):
        raise ConfigError(f"{where}: resume={cfg.resume!r}; expected auto, never or a path to a .ckpt file")


def validate_align(cfg: DictConfig, where: str) -> None:
    """Check a `train.py align` config: the volume encoder, the text, projection and loss settings, the
    usual numbers."""
    from medsyn.alignment.losses import LOCAL_POOLS
    from medsyn.alignment.model import POOLS, VolumeEncoder, volume_encoder_config

    spec = volume_encoder_config(to_container(cfg.model), f"{where}: model")
    try:
        with torch.device("meta"):  # the constructor's checks, without memory
            VolumeEncoder(**spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: model: {err}") from err
    _check_trainer(cfg, where)
    for key, allowed in (("text.pool", POOLS), ("loss.local_pool", LOCAL_POOLS), ("data.text", TEXT_MODES)):
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{where}: {key}={value!r}; expected one of {', '.join(allowed)}")
    for key in ("text.freeze", "text.trust_remote_code", "projection.learn_temperature"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ConfigError(f"{where}: {key}={OmegaConf.select(cfg, key)!r}; expected true or false")
    if not cfg.text.model or not isinstance(cfg.text.model, str):
        raise ConfigError(f"{where}: text.model={cfg.text.model!r}; expected a model directory or hub name")
    integers = (*_INTEGERS[:6], ("text.max_length", 8, "an integer >= 8 (tokens)"),
                ("projection.dim", 1, "a positive integer"),
                ("data.batch_size", 2, "an integer >= 2 (a contrastive batch needs negatives)"),
                ("effective_batch_size", 1, "a positive integer"))  # fmt: skip
    numbers = (*_NUMBERS, ("projection.temperature", 0.0, True, "a number in (0, 1], e.g. 0.07"),
               ("loss.global_weight", 0.0, False, "a number >= 0"), ("loss.local_weight", 0.0, False, "a number >= 0"),
               ("loss.softmax_temperature", 0.0, True, "a number > 0, e.g. 0.1"))  # fmt: skip
    _check_settings(cfg, where, integers, numbers)
    if cfg.projection.temperature > 1.0:
        raise ConfigError(
            f"{where}: projection.temperature={cfg.projection.temperature!r}; expected a number in (0, 1]"
        )
    if cfg.loss.global_weight == 0 and cfg.loss.local_weight == 0:
        raise ConfigError(
            f"{where}: loss.global_weight and loss.local_weight are both 0; expected one above 0"
        )


# (key, minimum, what is expected) of the integer settings medsyn reads itself
_INTEGERS = (
    ("seed", -(2**63), "an integer"),
    ("data.num_workers", 0, "an integer >= 0 (0: load in the main process)"),
    ("trainer.max_steps", -1, "an integer >= -1 (-1: no limit)"),
    ("checkpoint.every_n_steps", 0, "an integer >= 0 (0: only where the fit stops)"),
    ("checkpoint.keep", 1, "an integer >= 1 (how many step checkpoints to keep)"),
    ("optim.warmup_steps", 0, "an integer >= 0"),
    ("preview.every_n_steps", 0, "an integer >= 0 (0: no previews)"),
)
# (key, lower bound, whether the bound is excluded, what is expected) of number settings
_NUMBERS = (
    ("optim.lr", 0.0, True, "a number > 0, e.g. 1.0e-4"),
    ("optim.weight_decay", 0.0, False, "a number >= 0"),
    ("optim.eps", 0.0, True, "a number > 0, e.g. 1.0e-8"),
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def accumulation(effective_batch_size: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps so that batch x world x accumulation reaches the effective batch."""
    per_step = batch_size * world_size
    steps = max(1, round(effective_batch_size / per_step))
    return steps
