"""Run configuration of `train.py vqgan`: its defaults and checks (read by `medsyn.training.config`).

Sections: `model` the `VQGAN` (medsyn.radiograph.vqgan: a preset and/or its arguments), `discriminator`
MONAI's `PatchDiscriminator` (2-D, one channel in and out: those medsyn sets), `loss` the weights of the
generator's losses and the step the adversarial game starts at, `codebook` when unused codes restart,
`optim` / `disc_optim` the two AdamW optimizers (`build_optimizer` arguments plus the gradient-norm clip
each applies), `data` the radiograph cache. Kept apart from the training module so that `medsyn.training.config` can read it without a cycle.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from monai.networks.nets import PatchDiscriminator
from omegaconf import DictConfig, OmegaConf

from medsyn.config import check_keys, constructor_keys, to_container
from medsyn.errors import ConfigError
from medsyn.radiograph.vqgan import build_vqgan

# PatchDiscriminator arguments medsyn sets itself
DISCRIMINATOR_FIXED = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1}

VQGAN_RUN: dict[str, Any] = {
    "stage": "vqgan",
    "run_dir": "runs/vqgan",
    "seed": 0,
    "resume": "auto",  # auto: continue from the newest readable checkpoint in run_dir; never; or a path
    "overwrite": False,  # with resume=never: delete the checkpoints a run_dir holds and start afresh
    "model": {"preset": "vqgan-256"},  # VQGAN preset and/or arguments (medsyn.radiograph.vqgan)
    "discriminator": {"channels": 64, "num_layers_d": 3},  # PatchDiscriminator arguments
    "loss": {
        "l1_weight": 1.0,  # |reconstruction - image|
        "codebook_weight": 1.0,  # the VQ commitment loss (the codebook itself follows the encodings by EMA)
        "perceptual_weight": 0.0,  # MONAI PerceptualLoss (LPIPS): needs its network's weights downloaded
        "perceptual_network": "alex",
        "adv_weight": 0.01,  # least-squares PatchGAN loss of the generator
        "adv_start_step": 2000,  # the discriminator trains, and the generator is judged, from this step
    },
    # codes used less than this many times a batch (EMA of the counts) restart at an encoding of the batch
    # (0: never); the first step so places the whole codebook among the encodings
    "codebook": {"restart_threshold": 0.1},
    "data": {
        "root": "data/drr",  # a radiograph cache (`medsyn drr`, `medsyn prepare --cxr`)
        "size": None,  # the cache's image side, checked; null: model.image_size
        "batch_size": 8,
        "num_workers": 4,
        "text": "both",  # (the reports are not used; the radiograph loader reads them)
    },
    "effective_batch_size": 8,  # two optimizers stepped by hand: no gradient accumulation, = data.batch_size
    "optim": {
        "lr": 1.0e-4,
        "betas": [0.5, 0.9],
        "weight_decay": 0.0,
        "eps": 1.0e-8,
        "warmup_steps": 0,
        "gradient_clip_val": 1.0,
    },
    "disc_optim": {
        "lr": 4.0e-4,
        "betas": [0.5, 0.9],
        "weight_decay": 0.0,
        "eps": 1.0e-8,
        "warmup_steps": 0,
        "gradient_clip_val": 1.0,
    },
    "checkpoint": {"every_n_steps": 1000, "keep": 2},
    "logger": {"kind": "wandb", "project": "medsyn", "name": None, "entity": None, "offline": None},
    "trainer": {
        "max_steps": 40000,
        "accelerator": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",  # several GPUs: ddp_find_unused_parameters_true (the discriminator waits)
        "precision": "bf16-mixed",
        "log_every_n_steps": 10,
        "val_check_interval": 1000,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 8,
    },
}

OPEN_KEYS = ["model", "discriminator", "trainer"]  # checked against their constructors, not the defaults


def defaults() -> dict[str, Any]:
    """The default run config of `train.py vqgan`."""
    return to_container(OmegaConf.create(VQGAN_RUN))


def validate_vqgan(cfg: DictConfig, where: str) -> None:
    """Check a `train.py vqgan` config: the model and discriminator against their constructors, the loss
    weights, data and optimizer settings; errors name the key."""
    with torch.device("meta"):  # the constructors' checks, without memory
        build_vqgan(to_container(cfg.model), "model")
        build_discriminator(to_container(cfg.discriminator))
    reserved = {"callbacks", "logger", "default_root_dir", "use_distributed_sampler", "accumulate_grad_batches",
                "enable_checkpointing", "gradient_clip_val", "gradient_clip_algorithm"}  # fmt: skip
    if cfg.trainer.get("gradient_clip_val") is not None:
        raise ConfigError(
            f"{where}: trainer.gradient_clip_val={cfg.trainer.gradient_clip_val!r}: the VQ-GAN steps its two "
            "optimizers by hand; set optim.gradient_clip_val and disc_optim.gradient_clip_val instead"
        )
    check_keys(cfg.trainer, [k for k in constructor_keys(pl.Trainer) if k not in reserved],
               f"{where}: trainer (Lightning Trainer arguments)")  # fmt: skip
    integers = [("seed", -(2**63)), ("data.batch_size", 1), ("data.num_workers", 0), ("effective_batch_size", 1),
                ("trainer.max_steps", -1), ("checkpoint.every_n_steps", 0), ("checkpoint.keep", 1),
                ("loss.adv_start_step", 0), ("optim.warmup_steps", 0), ("disc_optim.warmup_steps", 0)]  # fmt: skip
    for key, low in integers:
        value = OmegaConf.select(cfg, key)
        if value is None and key == "trainer.max_steps":
            continue
        if not _is_int(value) or value < low:
            raise ConfigError(f"{where}: {key}={value!r}; expected an integer >= {low}")
    numbers = [
        "codebook.restart_threshold",
        *(f"loss.{k}_weight" for k in ("l1", "codebook", "perceptual", "adv")),
    ]
    numbers += [f"{s}.{k}" for s in ("optim", "disc_optim") for k in ("weight_decay", "gradient_clip_val")]
    for key in numbers:
        value = OmegaConf.select(cfg, key)
        if key.endswith("gradient_clip_val") and value is None:
            continue
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: {key}={value!r}; expected a number >= 0")
    for key in ("optim.lr", "disc_optim.lr", "optim.eps", "disc_optim.eps"):
        value = OmegaConf.select(cfg, key)
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: {key}={value!r}; expected a number > 0")
    for key in ("optim.betas", "disc_optim.betas"):
        betas = to_container(OmegaConf.select(cfg, key))
        if not (
            isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise ConfigError(f"{where}: {key}={betas!r}; expected two numbers in [0, 1)")
    if cfg.loss.l1_weight == 0 and cfg.loss.perceptual_weight == 0:
        raise ConfigError(
            f"{where}: loss.l1_weight and loss.perceptual_weight are both 0; expected one above 0"
        )
    if cfg.effective_batch_size != cfg.data.batch_size:
        raise ConfigError(
            f"{where}: effective_batch_size={cfg.effective_batch_size}: the VQ-GAN does not accumulate gradients; "
            f"expected data.batch_size ({cfg.data.batch_size})"
        )
    size, image_size = cfg.data.size, build_vqgan(to_container(cfg.model), "model").image_size
    if size is not None and size != image_size:
        raise ConfigError(f"{where}: data.size={size!r}; expected null or model.image_size ({image_size})")
    if str(cfg.resume) not in ("auto", "never") and not str(cfg.resume).endswith(".ckpt"):
        raise ConfigError(f"{where}: resume={cfg.resume!r}; expected auto, never or a path to a .ckpt file")


def build_discriminator(spec: dict[str, Any], where: str = "discriminator") -> PatchDiscriminator:
    """MONAI's PatchDiscriminator for one-channel 2-D images from a `discriminator` section."""
    spec = dict(spec or {})
    valid = [k for k in constructor_keys(PatchDiscriminator) if k not in DISCRIMINATOR_FIXED]
    check_keys(spec, valid, where)
    try:
        return PatchDiscriminator(**DISCRIMINATOR_FIXED, **spec)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{where}: {' '.join(str(err).split())}") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
