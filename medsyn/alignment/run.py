"""Load a trained `train.py align` run for inference: `load_align_run(run_dir) -> AlignRun`.

A run aligns reports with CT volumes (`spatial_dims` 3, 4 channels) or with radiographs (2, 1 channel),
as its config's `model` section says (configs saved before 2D runs existed mean 3D).

The run's `model.safetensors` holds the weights and, in its metadata, the merged run config; the model
is rebuilt from that config (the same builder as training) in eval mode. A frozen text encoder's weights
are not in the file: they load from the run's `text.model` (a fine-tuned one's are in the file, under
`text.encoder.`), and so does the tokenizer. Errors name the run directory or file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsyn.alignment.model import AlignmentModel, Grid, build_alignment_model, patch_box
from medsyn.errors import DataError, MedsynError
from medsyn.weights import WEIGHTS_FILE, load_weights, sha256_file


@dataclass
class AlignRun:
    """A trained alignment model ready to embed volumes and reports (eval mode, no gradients)."""

    run_dir: Path
    config: dict
    model: AlignmentModel
    weights: Path
    sha256: str

    @property
    def tokenizer(self) -> Any:
        return self.model.text.tokenizer

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @property
    def spatial_dims(self) -> int:
        """2 for a radiograph run, 3 for a CT volume run."""
        return self.model.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.model.volume.in_channels

    @property
    def device(self) -> torch.device:
        return self.model.log_scale.device

    @torch.no_grad()
    def encode_volumes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """(B, C, *S) images as the run was trained on them (CT: the cache's 4 base-resolution channels,
        (B, 4, D, H, W); radiographs: (B, 1, H, W); diffusion range) -> global (B, D), patches (B, P, D),
        both L2-normalised, and the patch grid (P = its product; see `patch_box`)."""
        out = self.model.encode_volumes(x.to(self.device, torch.float32))
        return out.global_, out.patches, out.grid

    @torch.no_grad()
    def encode_reports(
        self, texts: str | Sequence[str]
    ) -> tuple[torch.Tensor, list[list[str]], list[torch.Tensor]]:
        """Report texts -> global (B, D) L2-normalised, each report's words as written, and its word
        embeddings (W_i, D) L2-normalised (no padding)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.model.encode_reports(texts)
        feats = [out.words[b, : len(words)] for b, words in enumerate(out.strings)]
        return out.global_, out.strings, feats

    @staticmethod
    def word_patch_similarity(words: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (W, P) of word embeddings (W, D) with patch embeddings (P, D)."""
        return words.to(patches) @ patches.T

    def patch_box(self, index: int, grid: Grid) -> tuple[slice, ...]:
        """The box (slices per axis of the base-resolution volume, or of the radiograph) of patch token
        `index`."""
        return patch_box(index, grid, self.patch_size)


def load_align_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> AlignRun:
    """The alignment model of an align run directory (its `model.safetensors`), in eval mode on `device`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such weights file; train the run with `python train.py align` first")
    state, config = load_weights(path)
    if config.get("stage") != "align":
        raise DataError(f"{path}: weights of a {config.get('stage')!r} run, not of `train.py align`")
    try:
        model = build_alignment_model(config)
    except MedsynError as err:
        raise DataError(f"{path}: cannot rebuild its model ({err})") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"{path}: the weights do not fit the model its config describes ({first})") from err
    model.eval().requires_grad_(False).to(device)
    return AlignRun(run_dir, config, model, path, sha256_file(path))
