"""The run config of `train.py cxr` (the report-to-radiograph language model): its defaults and checks.

Kept apart from `medsyn.training.cxr` so that `medsyn.training.config` can read the defaults without
importing the training code (which imports the config module itself).

Sections: `vqgan` the VQ-GAN run whose codes the model learns; `keypatches` the 2D alignment run and
codebook the clues are retrieved from (null: no clues); `model` the causal LM (`medsyn.radiograph.lm`);
`sequence` the token layout and condition dropout; `data`, `optim`, `checkpoint`, `logger`, `trainer` as
in the other stages.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medsyn.config import check_keys, constructor_keys, to_container
from medsyn.errors import ConfigError

CXR_RUN: dict[str, Any] = {
    "stage": "cxr",
    "run_dir": "runs/cxr",
    "seed": 0,
    "resume": "auto",
    "overwrite": False,
    "vqgan": "runs/vqgan",  # a `train.py vqgan` run directory: images become its codes, samples its decodings
    # {align: RUN, codebook: DIR, k3: 3, max_keypatches: 8}: a 2D align run and its codebook (`medsyn codebook
    # build`); each report's keypatches (the subject's own excluded) go before the image. null: no clues
    "keypatches": None,
    "model": {
        "name": None,  # a transformers causal LM: local directory or hub name (safetensors weights)
        "revision": None,
        # a new model when `name` is null: {model_type, ...its config arguments}
        "config": {"model_type": "gpt2", "n_layer": 6, "n_head": 8, "n_embd": 512, "n_positions": 1024},
        "tokenizer": None,  # directory or hub name; null: name's, or one trained on the training reports
        "tokenizer_vocab_size": 2000,  # of a tokenizer trained on the reports
    },
    "sequence": {
        "instruction": "Generate a frontal chest radiograph that matches this report.",
        "max_report_tokens": 160,
        "ucg_rate": 0.1,  # condition dropout (empty report, no keypatches), for classifier-free guidance
    },
    "data": {
        "root": "data/drr",  # a radiograph cache (`medsyn drr`, `medsyn prepare --cxr`)
        "batch_size": 8,
        "num_workers": 2,
        "text": "both",  # findings | impression | both
    },
    "effective_batch_size": 32,
    "optim": {"lr": 3.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "eps": 1.0e-8, "warmup_steps": 500},
    "checkpoint": {"every_n_steps": 1000, "keep": 2},
    "logger": {"kind": "wandb", "project": "medsyn", "name": None, "entity": None, "offline": None},
    "trainer": {
        "max_steps": 50000,
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
OPEN_KEYS = ["model.config", "keypatches", "trainer"]  # checked by validate_cxr, not by the merge
KEYPATCH_KEYS = ("align", "codebook", "k3", "max_keypatches")
_INTEGERS = (  # (key, minimum, what is expected)
    ("seed", -(2**63), "an integer"),
    ("data.batch_size", 1, "a positive integer"),
    ("data.num_workers", 0, "an integer >= 0"),
    ("effective_batch_size", 1, "a positive integer"),
    ("checkpoint.every_n_steps", 0, "an integer >= 0"),
    ("checkpoint.keep", 1, "an integer >= 1"),
    ("optim.warmup_steps", 0, "an integer >= 0"),
)
_RESERVED_TRAINER = {"callbacks", "logger", "default_root_dir", "use_distributed_sampler",
                     "accumulate_grad_batches", "enable_checkpointing"}  # fmt: skip


def defaults() -> dict[str, Any]:
    """A fresh copy of the defaults."""
    return to_container(OmegaConf.create(CXR_RUN))


def _int(cfg: DictConfig, key: str, minimum: int, what: str) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}; expected {what}")


def _number(cfg: DictConfig, key: str, low: float, high: float, what: str) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ConfigError(f"{key}={value!r}; expected {what}")


def validate_cxr(cfg: DictConfig, where: str) -> None:
    """Check a `train.py cxr` config: paths given, the keypatch section, the LM section, the numbers."""
    import lightning.pytorch as pl

    from medsyn.data.datamodule import TEXT_MODES
    from medsyn.radiograph.lm import scratch_config

    try:
        for key in ("vqgan", "data.root", "run_dir"):
            if not OmegaConf.select(cfg, key) or not isinstance(OmegaConf.select(cfg, key), str):
                raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}; expected a path")
        if cfg.keypatches is not None:
            if not isinstance(cfg.keypatches, DictConfig):
                raise ConfigError(f"keypatches={cfg.keypatches!r}; expected {{align, codebook, k3, "
                                  "max_keypatches} or null")  # fmt: skip
            check_keys(cfg.keypatches, KEYPATCH_KEYS, "keypatches")
            for key in ("align", "codebook"):
                if not isinstance(cfg.keypatches.get(key), str) or not cfg.keypatches.get(key):
                    raise ConfigError(f"keypatches.{key}={cfg.keypatches.get(key)!r}; expected a path")
            cfg.keypatches.setdefault("k3", 3)
            cfg.keypatches.setdefault("max_keypatches", 8)
            _int(cfg, "keypatches.k3", 1, "an integer >= 1 (keypatches per word)")
            _int(cfg, "keypatches.max_keypatches", 1, "an integer >= 1")
        check_keys(cfg.model, CXR_RUN["model"], "model")
        for key, value in CXR_RUN["model"].items():  # a model section in a file replaces the default whole
            if key not in cfg.model:
                cfg.model[key] = value
        if cfg.model.name is not None and not isinstance(cfg.model.name, str):
            raise ConfigError(
                f"model.name={cfg.model.name!r}; expected a model directory, a hub name or null"
            )
        if not cfg.model.name:
            scratch_config(to_container(cfg.model.config) or {})
        _int(cfg, "model.tokenizer_vocab_size", 16, "an integer >= 16")
        if not isinstance(cfg.sequence.instruction, str):
            raise ConfigError(f"sequence.instruction={cfg.sequence.instruction!r}; expected a text")
        _int(cfg, "sequence.max_report_tokens", 1, "an integer >= 1")
        _number(cfg, "sequence.ucg_rate", 0.0, 0.999, "a number in [0, 1) (0: no condition dropout)")
        if cfg.data.text not in TEXT_MODES:
            raise ConfigError(f"data.text={cfg.data.text!r}; expected one of {', '.join(TEXT_MODES)}")
        for key, minimum, what in _INTEGERS:
            _int(cfg, key, minimum, what)
        if cfg.trainer.get("max_steps") is not None:
            _int(cfg, "trainer.max_steps", -1, "an integer >= -1 (-1: no limit)")
        _number(cfg, "optim.lr", 1e-12, math.inf, "a number > 0, e.g. 3.0e-4")
        _number(cfg, "optim.weight_decay", 0.0, math.inf, "a number >= 0")
        _number(cfg, "optim.eps", 1e-30, math.inf, "a number > 0")
        betas = to_container(cfg.optim.betas)
        if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                                     for b in betas)):  # fmt: skip
            raise ConfigError(f"optim.betas={betas!r}; expected two numbers in [0, 1)")
        if str(cfg.resume) not in ("auto", "never") and not str(cfg.resume).endswith(".ckpt"):
            raise ConfigError(f"resume={cfg.resume!r}; expected auto, never or a path to a .ckpt file")
        trainer_keys = [k for k in constructor_keys(pl.Trainer) if k not in _RESERVED_TRAINER]
        check_keys(cfg.trainer, trainer_keys, "trainer (Lightning Trainer arguments)")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
