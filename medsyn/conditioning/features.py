"""Text-feature caching: an in-memory LRU per exact string, and safetensors files keyed by sha1.

A fixed report set (the phantom reports, a prompt list) is encoded again at every step otherwise;
the frozen encoder makes the features a pure function of the text, so they can be stored once.
Features are kept unpadded, one (L_i, H) tensor per text, and padded again when a batch is built.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from medsyn.errors import DataError
from medsyn.io import atomic_path

FEATURE_FORMAT = "medsyn.text.features/1"


def text_key(text: str) -> str:
    """The sha1 hex digest of the UTF-8 text: the key of its features in a feature file."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def collate(features: Sequence[torch.Tensor], length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad per-text features (L_i, H) into a batch: context (B, L, H), zeros beyond each text; mask (B, L).

    `length` defaults to the longest text; a shorter `length` is an error (features are never cut here).
    """
    longest = max(f.shape[0] for f in features)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"cannot pad features of {longest} tokens to length {length}")
    first = features[0]
    context = first.new_zeros(len(features), length, first.shape[-1])  # (B, L, H)
    mask = torch.zeros(len(features), length, dtype=torch.bool, device=first.device)  # (B, L)
    for i, f in enumerate(features):
        context[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return {"context": context, "context_mask": mask}


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    maxsize: int


class FeatureCache:
    """A size-bounded LRU map from exact text to its unpadded features (L_i, H)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError(f"cache maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, text: str) -> bool:
        return text in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str) -> torch.Tensor | None:
        """The cached features, marked most recently used, or None (counted as a miss)."""
        item = self._items.get(text)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(text)
        return item

    def put(self, text: str, features: torch.Tensor) -> None:
        """Store features, evicting the least recently used entries beyond `maxsize`."""
        if self.maxsize == 0:
            return
        self._items[text] = features
        self._items.move_to_end(text)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
        self.hits = self.misses = 0

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._items), self.maxsize)


def save_features(
    path: str | os.PathLike, features: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write {text: features (L_i, H)} to a safetensors file keyed by `text_key`, atomically."""
    from safetensors.torch import save_file

    tensors = {text_key(t): f.detach().to("cpu", torch.float32).contiguous() for t, f in features.items()}
    meta = {"format": FEATURE_FORMAT, **{k: str(v) for k, v in metadata.items()}}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a feature file; DataError if it is missing or not a medsyn feature file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"text feature file {path} does not exist; write it with TextConditioner.precompute")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"text feature file {path} is not a readable safetensors file: {err}") from err
    if meta.get("format") != FEATURE_FORMAT:
        raise DataError(f"{path} is not a medsyn text feature file (format {meta.get('format')!r})")
    return meta


def load_features(path: str | os.PathLike, texts: Sequence[str]) -> list[torch.Tensor]:
    """The stored features (L_i, H) of each text, in order; DataError naming a text that is absent."""
    from safetensors import safe_open

    read_metadata(path)
    out = []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for text in texts:
            key = text_key(text)
            if key not in keys:
                raise DataError(
                    f"text feature file {path} has no features for {text[:60]!r}"
                    f"{'...' if len(text) > 60 else ''} (sha1 {key}); precompute it again with this text"
                )
            out.append(f.get_tensor(key))
    return out
