"""Segmentation backends for the mask channels (lobes 0..5, airway, vessels), behind a registry.

A backend is a callable `backend(hu, affine) -> {channel: uint8 array}` on a RAS HU volume; it may
return only some of `lobes, airway, vessels` (lungmask gives lobes only). `segment` fills the rest
with the `threshold` backend, restricted to the lungs the first backend found, and keeps any mask
the input already gives untouched.

Backends are registered by import path so that heavy optional packages load only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from monai.metrics import compute_dice

from medsyn.data.channels import MASK_CHANNELS
from medsyn.errors import ConfigError

Segmenter = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]

_REGISTRY: dict[str, str | Callable[..., Segmenter]] = {
    "threshold": "medsyn.data.segment.threshold:ThresholdSegmenter",
    "totalsegmentator": "medsyn.data.segment.totalsegmentator:TotalSegmentatorBackend",
    "lungmask": "medsyn.data.segment.lungmask:LungmaskBackend",
}
DEFAULT_BACKEND = "threshold"


def register_backend(name: str, factory: str | Callable[..., Segmenter]) -> None:
    """Add a backend: a factory, or a `"module:attribute"` string imported on first use."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Names accepted by `get_backend` and `medsyn prepare --backend`."""
    return sorted(_REGISTRY)


def get_backend(name: str, **kwargs) -> Segmenter:
    """Build the backend registered under `name`; `kwargs` go to its constructor."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown segmentation backend {name!r}; expected one of {available_backends()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module_name), attribute)
    return factory(**kwargs)


def segment(
    hu: np.ndarray,
    affine: np.ndarray,
    backend: Segmenter | None,
    given: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """All three mask channels for a RAS HU volume: `given` ones as they are, the rest from `backend`.

    Channels the backend does not provide come from the threshold backend (inside the backend's lungs).
    """
    from medsyn.data.segment.threshold import ThresholdSegmenter

    masks = {name: np.asarray(mask).astype(np.uint8) for name, mask in (given or {}).items()}
    missing = [c for c in MASK_CHANNELS if c not in masks]
    if not missing:
        return masks
    found = dict(backend(hu, affine)) if backend is not None else {}
    if any(c not in found for c in missing):
        lungs = masks.get("lobes", found.get("lobes"))
        fallback = ThresholdSegmenter()(hu, affine, lungs=None if lungs is None else lungs > 0)
        found = {**fallback, **found}
    for name in missing:
        masks[name] = np.asarray(found[name]).astype(np.uint8)
    return masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks of the same shape (1.0 when both are empty), by MONAI's metric."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: masks of different shapes {a.shape} and {b.shape}")
    # (1, 1, N): one batch item, one foreground channel; ignore_empty=False scores two empty masks 1.0
    pred, true = (torch.from_numpy(m.reshape(1, 1, -1).astype(np.uint8)) for m in (a, b))
    return float(compute_dice(pred, true, ignore_empty=False).item())
