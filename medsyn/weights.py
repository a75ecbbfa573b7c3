"""Weights as data: `model.safetensors` with the run config in its metadata (written by training,
read by generation).

Users share these files; loading them runs no code (unlike a pickled checkpoint).
Keys: `net.*` the UNet, `text.*` the trainable text parts (e.g. a learned null condition).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medsyn.errors import DataError
from medsyn.io import atomic_path

WEIGHTS_FILE = "model.safetensors"
FORMAT = "medsyn-weights-1"


def export_weights(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write `state` (CPU, contiguous copies) and `config` (as JSON metadata) to `path` atomically."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "stage": str(config.get("stage", "")),
        "config": json.dumps(config, default=str),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_weights(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read exported weights; returns `(state, config)`. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such weights file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT:
        raise DataError(
            f"{path}: not medsyn weights (metadata format {metadata.get('format')!r}, expected {FORMAT})"
        )
    return state, json.loads(metadata.get("config", "{}"))


def split_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (provenance in sample metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
