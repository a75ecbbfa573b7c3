"""Build a UNet from a preset name, a YAML file or a mapping of constructor arguments."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medsyn.config import check_keys, constructor_keys, load_yaml, to_container
from medsyn.errors import ConfigError
from medsyn.nn.presets import PRESETS
from medsyn.nn.unet import UNet

ModelSpec = str | os.PathLike | Mapping[str, Any]


def model_config(spec: ModelSpec, **overrides: Any) -> dict[str, Any]:
    """Resolve `spec` to the full dict of UNet constructor arguments.

    `spec` is a preset name (`base-700m`), a YAML file (UNet keys at the top level or under `model:`),
    or a mapping; a mapping may name a `preset` that its other keys override.
    """
    where = "the model config"
    if isinstance(spec, (str, os.PathLike)) and str(spec) in PRESETS:
        spec = {"preset": str(spec)}
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml") and not path.exists():
            raise ConfigError(f"unknown model preset '{spec}'; valid presets: {', '.join(PRESETS)}")
        cfg = load_yaml(path)
        where = str(path)
        spec = to_container(cfg.model if "model" in cfg else cfg)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{path}: 'model' must be a mapping of UNet arguments")
    spec = dict(to_container(spec))
    spec.update(overrides)
    preset = spec.pop("preset", None)
    valid = constructor_keys(UNet)
    check_keys(spec, valid + ["preset"], where)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown model preset '{preset}' in {where}; valid presets: {', '.join(PRESETS)}"
            )
        spec = {**PRESETS[preset], **spec}
    return spec


def build_model(
    spec: ModelSpec,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> UNet:
    """Build a UNet from a preset, a YAML file or a mapping, with keyword overrides.

    `device="meta"` builds it without allocating memory, to count parameters and FLOPs of
    paper-scale presets on any machine.
    """
    kwargs = model_config(spec, **overrides)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = UNet(**kwargs)
    except ValueError as err:
        raise ConfigError(f"invalid model config: {err}") from err
    return model.to(dtype=dtype) if dtype is not None else model
