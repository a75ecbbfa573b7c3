"""The diffusion model of a run: a denoiser and its conditioners, built from the run config.

One builder serves training (`medsyn.training.module`) and loading a trained run
(`medsyn.generation.run`), so the two can never build different models. What differs between the base
and the SR stage lives in the config: the conditioner sections it has (`text`, `lowres`; see
`medsyn.conditioning.CONDITIONERS`), the UNet preset, and which of the cache's grids it learns.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medsyn.conditioning import CONDITIONERS
from medsyn.config import check_keys, constructor_keys
from medsyn.diffusion import Denoiser, build_denoiser
from medsyn.errors import ConfigError
from medsyn.nn.build import build_model
from medsyn.weights import split_state

# diffusion settings a conditioner may share with the denoiser (taken by name from `diffusion`)
SHARED_DIFFUSION_KEYS = ("schedule", "schedule_shift")
RESOLUTIONS = ("lr", "hr")  # which of the cache's stacks a model learns: base lr (64^3), SR hr (256^3)


class DiffusionModel(nn.Module):
    """A denoiser `denoiser(x_t, t, **cond) -> x0` and the conditioners that make `cond` from raw inputs.

    conditioners: keyed by the input each reads (a run config section name, e.g. "text", "lowres").
    """

    def __init__(self, denoiser: Denoiser, conditioners: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.conditioners = nn.ModuleDict(dict(conditioners))

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def out_channels(self) -> int:
        return int(self.denoiser.net.out_channels)

    def condition(
        self,
        inputs: Mapping[str, Any],
        *,
        train: bool = False,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Network keyword arguments from raw inputs (`inputs[key]` for each conditioner).

        train: with training randomness (condition dropout, random augmentation levels).
        generator: one generator, or one per sample (generation: a sample never depends on its batch).
        options: per-conditioner keyword arguments, e.g. {"lowres": {"level": 0.1}}.
        """
        cond: dict[str, torch.Tensor] = {}
        for key, conditioner in self.conditioners.items():
            if key not in inputs:
                raise KeyError(f"the model is conditioned on '{key}', which the inputs lack")
            extra = dict((options or {}).get(key, {}))
            cond.update(conditioner(inputs[key], train=train, generator=generator, **extra))
        return cond

    def unconditional(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The unconditional counterpart of `cond` for classifier-free guidance, or None when no
        conditioner has a null condition (then guidance does not apply)."""
        nulls = [c.unconditional(cond) for c in self.conditioners.values()]
        if all(n is None for n in nulls):
            return None
        out = dict(cond)
        for null in nulls:
            out.update(null or {})
        return out

    def exported_state(self, denoiser: Denoiser | None = None) -> dict[str, torch.Tensor]:
        """What inference needs: `net.*` (the UNet; of `denoiser` if given, e.g. the EMA copy) and
        `<key>.*` for each conditioner's own weights (the frozen text encoder is left out)."""
        net = (denoiser or self.denoiser).net
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        for key, conditioner in self.conditioners.items():
            state.update({f"{key}.{k}": v for k, v in conditioner.state_dict().items()})
        return state

    def load_exported_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load `exported_state` output (strict: a missing or unexpected key is an error)."""
        self.denoiser.net.load_state_dict(split_state(state, "net"))
        for key, conditioner in self.conditioners.items():
            conditioner.load_state_dict(split_state(state, key))
        known = ("net", *self.conditioners)
        stray = sorted({k.split(".", 1)[0] for k in state} - set(known))
        if stray:
            raise RuntimeError(f"unexpected weights under {stray}; this model has {list(known)}")

    def count_parameters(self) -> dict[str, int]:
        out = {"unet": sum(p.numel() for p in self.denoiser.net.parameters())}
        for key, conditioner in self.conditioners.items():
            params = list(conditioner.parameters())
            if params:
                out[f"{key}_trainable"] = sum(p.numel() for p in params if p.requires_grad)
                out[f"{key}_frozen"] = sum(p.numel() for p in params if not p.requires_grad)
        return out


def conditioner_keys(cls: type) -> list[str]:
    """The keys a conditioner's config section may hold (shared diffusion settings come from `diffusion`)."""
    return [k for k in constructor_keys(cls) if k not in SHARED_DIFFUSION_KEYS]


def build_conditioners(config: Mapping[str, Any]) -> dict[str, nn.Module]:
    """One conditioner per section of `config` named in `CONDITIONERS`, built from that section."""
    diffusion = config.get("diffusion") or {}
    out: dict[str, nn.Module] = {}
    for key, cls in CONDITIONERS.items():
        section = config.get(key)
        if section is None:
            continue
        check_keys(section, conditioner_keys(cls), f"the run config: {key}")
        shared = {
            k: diffusion[k] for k in SHARED_DIFFUSION_KEYS if k in diffusion and k in constructor_keys(cls)
        }
        out[key] = cls(**section, **shared)
    return out


def build_diffusion_model(config: Mapping[str, Any]) -> DiffusionModel:
    """The denoiser and conditioners of a run config: `model` (UNet), `diffusion` (`build_denoiser`'s
    arguments) and one section per conditioner. Conditioners fix the UNet arguments they depend on
    (e.g. the text features' width as `cross_attention_dim`)."""
    conditioners = build_conditioners(config)
    unet_args: dict[str, Any] = {}
    for conditioner in conditioners.values():
        unet_args.update(conditioner.unet_arguments())
    try:
        denoiser = build_denoiser(
            build_model(config["model"], **unet_args), **(config.get("diffusion") or {})
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid diffusion settings in the run config: {err}") from err
    return DiffusionModel(denoiser, conditioners)


# keys of configs written by medsyn 0.1 before the conditioner sections existed: old -> new
_LEGACY_KEYS = {
    ("diffusion", "time_sampling"): ("loss", "time_sampling"),
    ("diffusion", "channel_weights"): ("loss", "channel_weights"),
    ("diffusion", "lowres_noise_max"): ("lowres", "noise_max"),
    ("diffusion", "lowres_noise_sample"): ("lowres", "noise_sample"),
    ("data", "upsample"): ("lowres", "upsample"),
}
_STAGE_RESOLUTION = {"base": "lr", "sr": "hr"}


def legacy_keys(config: Mapping[str, Any]) -> list[str]:
    """The dotted keys of `config` that earlier versions wrote and `upgrade_config` moves."""
    return [
        f"{section}.{key}"
        for section, key in _LEGACY_KEYS
        if isinstance(config.get(section), Mapping) and key in config[section]
    ]


def upgrade_config(config: Mapping[str, Any], stage: str | None = None) -> dict[str, Any]:
    """A run config in today's shape: keys that earlier versions wrote are moved to their sections, so
    run directories and YAML files written before the conditioner sections keep working.
    `stage` defaults to the config's own."""
    cfg = copy.deepcopy(dict(config))
    stage = stage or cfg.get("stage")
    for (old_section, old_key), (section, key) in _LEGACY_KEYS.items():
        old = cfg.get(old_section)
        if not isinstance(old, Mapping) or old_key not in old:
            continue
        value = dict(old).pop(old_key)
        cfg[old_section] = {k: v for k, v in old.items() if k != old_key}
        if section == "lowres" and stage != "sr":
            continue  # base configs carried the SR-only keys with their zero defaults
        cfg.setdefault(section, {})
        cfg[section] = {**cfg[section], key: value} if isinstance(cfg[section], Mapping) else cfg[section]
    data = cfg.get("data")
    if stage in _STAGE_RESOLUTION and isinstance(data, Mapping) and "resolution" not in data:
        cfg["data"] = {**data, "resolution": _STAGE_RESOLUTION[stage]}
    if stage == "sr" and "lowres" not in cfg:
        cfg["lowres"] = {}
    return cfg
