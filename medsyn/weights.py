"""Weights as data: `model.safetensors` with the run config in its metadata (written by training,
read by generation).

Users share these files; loading them runs no code (unlike a pickled checkpoint).
Keys: `net.*` the UNet, `text.*` the trainable text parts (e.g. a learned null condition).
The metadata's `sha256` (of the tensors and the other metadata) is checked on load, so a damaged file
is an error rather than a model that samples garbage; so are weights that are not finite. Files written
before the checksum existed load without that check.
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
from medsyn.io import atomic_path, usual_mode

WEIGHTS_FILE = "model.safetensors"
FORMAT = "medsyn-weights-1"


def export_weights(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write `state` (CPU, contiguous copies) and `config` (as JSON metadata) to `path` atomically.

    Non-finite weights are refused (DataError naming the tensor): they would sample nothing but noise.
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    _check_finite(path, tensors, "not written: ")
    metadata = {
        "format": FORMAT,
        "stage": str(config.get("stage", "")),
        "config": json.dumps(config, default=str),
    }
    metadata["sha256"] = weights_digest(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        usual_mode(tmp)  # save_file makes a new file with mode 0600
    return path


def load_weights(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read exported weights; returns `(state, config)`. Checks the checksum (when the file has one) and
    that every weight is finite. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such weights file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT:
        raise DataError(
            f"{path}: not medsyn weights (metadata format {metadata.get('format')!r}, expected {FORMAT})"
        )
    expected = metadata.get("sha256")
    if expected is not None and weights_digest(state, metadata) != expected:
        raise DataError(
            f"{path}: damaged (the sha256 of its tensors and metadata differs from the one recorded when it "
            "was written); export it again from the run's checkpoint or copy it again"
        )
    _check_finite(path, state, "")
    try:
        config = json.loads(metadata.get("config", "{}"))
    except ValueError as err:
        raise DataError(f"{path}: the config in its metadata is not valid JSON ({err})") from err
    if str(device) != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state, config


def weights_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Hex sha256 of the tensors (name, dtype, shape, bytes; by name) and of the metadata but `sha256`."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != "sha256":
            digest.update(json.dumps([key, metadata[key]]).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    return digest.hexdigest()


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(
                f"{path}: {prefix}{key} holds NaN or infinite values (the training diverged); "
                "use weights exported before that, or train again with a lower optim.lr"
            )


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
