"""The diffusion model of a run: a denoiser and its conditioners, built from the run config.

One builder serves training (`medsyn.training.module`) and loading a trained run
(`medsyn.generation.run`), so the two can never build different models. What differs between the base
and the SR stage lives in the config: the conditioner sections it has (`text`, `lowres`, `keypatches`;
see `CONDITIONERS`), the UNet preset, and which of the cache's grids it learns.
The run's `lobe_encoding` sets the channels the network denoises (4, or 6 with the lobes as analog bits):
the model takes and gives volumes of the four channels (`to_net`, `from_net`), whatever it denoises.
A run's `channels` names other data (the radiograph baseline: `[image]`, one channel); without it, the
four CT channels.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medsyn.alignment.conditioner import KeypatchConditioner
from medsyn.conditioning import LowResConditioner, TextConditioner
from medsyn.config import check_keys, constructor_keys
from medsyn.data.channels import CHANNELS, LOBE_ENCODINGS, from_net, net_channels, to_net
from medsyn.diffusion import Denoiser, build_denoiser
from medsyn.errors import ConfigError
from medsyn.nn.build import build_model
from medsyn.weights import split_state

# A run config's section name -> the conditioner it builds (the interface: medsyn.conditioning). A run
# conditions on each section it has, built in this order: the base stage on `text` (and `keypatches`,
# whose tokens join the text's), the SR stage on `lowres`. A new kind of model is a new entry here.
CONDITIONERS: dict[str, type] = {
    "text": TextConditioner,
    "lowres": LowResConditioner,
    "keypatches": KeypatchConditioner,
}
# diffusion settings a conditioner may share with the denoiser (taken by name from `diffusion`)
SHARED_DIFFUSION_KEYS = ("schedule", "schedule_shift")
SHARED_RUN_KEYS = ("lobe_encoding",)  # run settings a conditioner may take too (by name, from the top level)
# set by the builder: the token width of the conditioner that one `joins` (appends its tokens to)
JOINED_KEYS = ("context_dim",)
REPORT_KEYS = ("text", "keypatches")  # the conditioners that read the report (see `report_inputs`)
RESOLUTIONS = ("lr", "hr")  # which of the cache's stacks a model learns: base lr (64^3), SR hr (256^3)


class DiffusionModel(nn.Module):
    """A denoiser `denoiser(x_t, t, **cond) -> x0` and the conditioners that make `cond` from raw inputs.

    conditioners: keyed by the input each reads (a run config section name, e.g. "text", "lowres").
    lobe_encoding: how the network denoises the lobes ("levels" or "bits", `medsyn.data.channels`); None:
        the one with as many channels as the network has (a model wrapped around e.g. the EMA denoiser).
    channels: the data's channels (default the four CT channels; a radiograph: ("image",)).
    """

    def __init__(
        self, denoiser: Denoiser, conditioners: Mapping[str, nn.Module], lobe_encoding: str | None = None,
        channels: Sequence[str] = CHANNELS,
    ) -> None:  # fmt: skip
        super().__init__()
        self.denoiser = denoiser
        self.conditioners = nn.ModuleDict(dict(conditioners))
        self.channels = tuple(channels)
        if lobe_encoding is None:
            bits = "lobes" in self.channels and self.out_channels == len(net_channels("bits", self.channels))
            lobe_encoding = "bits" if bits else "levels"
        self.lobe_encoding = lobe_encoding

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def out_channels(self) -> int:
        """The channels the network denoises (`net_channels` of its lobe encoding)."""
        return int(self.denoiser.net.out_channels)

    def to_net(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4, *S) volumes in the diffusion range (lobes as levels) -> (B, out_channels, *S); data
        without lobes (a radiograph) as it is."""
        return to_net(x, self.lobe_encoding, self.channels)

    def from_net(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out_channels, *S) -> (B, 4, *S) volumes (bits: the levels of the nearest valid codes); data
        without lobes as it is."""
        return from_net(x, self.lobe_encoding) if "lobes" in self.channels else x

    def report_inputs(
        self, texts: Sequence[str], subjects: Sequence[str | None] | None = None
    ) -> dict[str, Any]:
        """The inputs of the conditioners that read reports: "text" the strings, "keypatches" (report,
        subject) pairs, the subject being the one whose own keypatches must not be retrieved (the training
        sample's; None, the default, for a new report)."""
        texts = list(texts)
        subjects = [None] * len(texts) if subjects is None else list(subjects)
        out: dict[str, Any] = {}
        if "text" in self.conditioners:
            out["text"] = texts
        if "keypatches" in self.conditioners:
            out["keypatches"] = list(zip(texts, subjects, strict=True))
        return out

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
        A conditioner that `joins` another gets that one's output and null condition (`joined`,
        `joined_null`) and returns the two's tokens together.
        """
        cond: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, conditioner in self.conditioners.items():
            if key not in inputs:
                raise KeyError(f"the model is conditioned on '{key}', which the inputs lack")
            extra = dict((options or {}).get(key, {}))
            joins = getattr(conditioner, "joins", None)
            if joins is not None:
                extra.update(
                    joined=parts[joins], joined_null=self.conditioners[joins].unconditional(parts[joins])
                )
            parts[key] = conditioner(inputs[key], train=train, generator=generator, **extra)
            cond.update(parts[key])
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
    """The keys a conditioner's config section may hold (shared diffusion settings come from `diffusion`,
    shared run settings from the top level, the joined tokens' width from the builder)."""
    shared = (*SHARED_DIFFUSION_KEYS, *SHARED_RUN_KEYS, *JOINED_KEYS)
    return [k for k in constructor_keys(cls) if k not in shared]


def lobe_encoding_of(config: Mapping[str, Any]) -> str:
    """The run's `lobe_encoding` ("levels" when the config has none), checked."""
    encoding = config.get("lobe_encoding", "levels")
    if encoding not in LOBE_ENCODINGS:
        raise ConfigError(
            f"lobe_encoding={encoding!r} in the run config; expected one of {', '.join(LOBE_ENCODINGS)}"
        )
    return encoding


def channels_of(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The run's data channels (`channels`; the four CT channels when the config has none), checked."""
    names = config.get("channels")
    if names is None:
        return CHANNELS
    if (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ConfigError(f"channels={names!r} in the run config; expected a list of distinct channel names")
    return tuple(names)


def build_conditioners(config: Mapping[str, Any]) -> dict[str, nn.Module]:
    """One conditioner per section of `config` named in `CONDITIONERS`, built from that section."""
    diffusion = config.get("diffusion") or {}
    run = {"lobe_encoding": lobe_encoding_of(config)}
    out: dict[str, nn.Module] = {}
    for key, cls in CONDITIONERS.items():
        section = config.get(key)
        if section is None:
            continue
        check_keys(section, conditioner_keys(cls), f"the run config: {key}")
        shared = {
            k: diffusion[k] for k in SHARED_DIFFUSION_KEYS if k in diffusion and k in constructor_keys(cls)
        }
        shared.update({k: run[k] for k in SHARED_RUN_KEYS if k in constructor_keys(cls)})
        joins = getattr(cls, "joins", None)
        if joins is not None:  # its tokens are appended to those of `joins`: of their width
            if joins not in out:
                raise ConfigError(f"the run config: {key} appends its tokens to the {joins} tokens; "
                                  f"it needs a {joins} section")  # fmt: skip
            shared["context_dim"] = out[joins].unet_arguments()["cross_attention_dim"]
        out[key] = cls(**section, **shared)
    return out


def build_diffusion_model(config: Mapping[str, Any]) -> DiffusionModel:
    """The denoiser and conditioners of a run config: `model` (UNet), `diffusion` (`build_denoiser`'s
    arguments), `channels`, `lobe_encoding` and one section per conditioner. The channels and lobe
    encoding fix the UNet's channels, conditioners the arguments they depend on (e.g. the text features'
    width as `cross_attention_dim`, the concatenated low-resolution volume's channels in `in_channels`)."""
    lobe_encoding = lobe_encoding_of(config)
    names = channels_of(config)
    conditioners = build_conditioners(config)
    channels = len(net_channels(lobe_encoding, names))
    unet_args: dict[str, Any] = {"in_channels": channels, "out_channels": channels}
    for conditioner in conditioners.values():
        unet_args.update(conditioner.unet_arguments())
    try:
        denoiser = build_denoiser(
            build_model(config["model"], **unet_args), **(config.get("diffusion") or {})
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid diffusion settings in the run config: {err}") from err
    return DiffusionModel(denoiser, conditioners, lobe_encoding, names)


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
