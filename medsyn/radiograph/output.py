"""Writing generated radiographs: OUT/<index>/ per sample, each written whole as it finishes.

    OUT/<index>/image.png        16-bit grayscale PNG: 0 .. 65535 = [-1, 1] (-1 black)
    OUT/<index>/keypatches.png   the retrieved keypatches as a contact sheet, each with the word that chose
                                 it (when the run uses keypatch clues)
    OUT/<index>/meta.json        index, prompt, seed, generator ("lm" or "diffusion"), options, weights
                                 ({name: {path, sha256}}), package versions, seconds, ...

The folders are made by `medsyn.sample_folders`, as the CT samples are: a sample is written into a hidden
temporary folder inside OUT and renamed to OUT/<index>/ when complete; a rerun of the same request (prompt,
seed, generator, options, weights) keeps those samples and makes the rest; a medsyn sample of another
request is replaced only with `overwrite`; nothing else in OUT is touched, and files medsyn did not write
make OUT unusable without `overwrite`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsyn.errors import DataError
from medsyn.io import atomic_path, write_json
from medsyn.sample_folders import IGNORED_OPTIONS, MakeBatch, SampleKind, write_samples
from medsyn.sample_folders import package_versions as versions_of

IMAGE_FILE, SHEET_FILE, META_FILE = "image.png", "keypatches.png", "meta.json"
SAMPLE_FILES = (IMAGE_FILE, SHEET_FILE, META_FILE)
GENERATORS = ("lm", "diffusion")


def package_versions() -> dict[str, str]:
    """Versions of the packages a radiograph sample depends on (provenance in meta.json)."""
    return versions_of(("medsyn", "torch", "transformers", "safetensors", "numpy", "pillow"))


def save_png16(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write an image (S, S) or (1, S, S) in [-1, 1] as a 16-bit grayscale PNG (0 .. 65535), atomically."""
    from PIL import Image

    array = np.asarray(image.detach().cpu().float() if isinstance(image, torch.Tensor) else image, np.float64)
    array = array[0] if array.ndim == 3 else array
    if array.ndim != 2:
        raise ValueError(f"save_png16 expects an image (S, S) or (1, S, S), got shape {array.shape}")
    levels = np.round((np.clip(array, -1.0, 1.0) + 1.0) * 32767.5).astype(np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(levels).save(tmp, format="PNG")


def read_png16(path: str | os.PathLike) -> np.ndarray:
    """A 16-bit grayscale PNG written by `save_png16`, as float32 (S, S) in [-1, 1] (0 -> -1, 65535 -> +1)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode, kind = im.mode, im.format
            levels = np.asarray(im, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the image ({err})") from None
    # Pillow opens 16-bit grayscale PNGs as "I;16" (older versions: "I")
    if kind != "PNG" or mode not in ("I;16", "I;16B", "I;16L", "I") or levels.ndim != 2:
        raise DataError(
            f"{path}: a {kind} image of mode {mode} and shape {levels.shape}; expected a 16-bit grayscale "
            "PNG (sample.py --cxr writes 0..65535 for [-1, 1])"
        )
    if levels.shape[0] != levels.shape[1]:
        raise DataError(f"{path}: image of {levels.shape[1]}x{levels.shape[0]} pixels; expected a square")
    return (levels / 32767.5 - 1.0).astype(np.float32)


def keypatch_sheet(crops: torch.Tensor | np.ndarray, words: Sequence[str], title: str = "") -> np.ndarray:
    """A contact sheet (RGB uint8) of keypatch crops (K, 1, p, p) or (K, p, p) in [-1, 1], each captioned
    with the word that chose it, in retrieval order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    crops = np.asarray(crops.detach().cpu().float() if isinstance(crops, torch.Tensor) else crops)
    crops = crops[:, 0] if crops.ndim == 4 else crops
    n = len(crops)
    cols = max(1, min(n, 8))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.3 * cols, 1.5 * rows + (0.3 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=8)
    for k in range(rows * cols):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_axis_off()
        if k < n:
            ax.imshow(crops[k], cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            ax.set_title(str(words[k])[:16], fontsize=8)
        elif n == 0 and k == 0:
            ax.text(0.5, 0.5, "no keypatches", ha="center", va="center", fontsize=8)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


@dataclass
class CXRSample:
    """One generated radiograph (1, S, S) in [-1, 1], its keypatch crops (K, 1, p, p) with their words
    (None: the run uses no keypatches) and what else its meta.json records."""

    image: torch.Tensor
    keypatches: torch.Tensor | None = None
    words: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def write_sample(directory: Path, sample: CXRSample, meta: dict[str, Any]) -> None:
    """Write one sample's files into `directory`."""
    from medsyn.viz import save_png

    save_png16(directory / IMAGE_FILE, sample.image)
    if sample.keypatches is not None:
        save_png(
            directory / SHEET_FILE, keypatch_sheet(sample.keypatches, sample.words, f"seed {meta['seed']}")
        )
    write_json(directory / META_FILE, {**meta, **sample.meta})


def request_of(meta: dict[str, Any]) -> dict[str, Any]:
    """What made a radiograph, from its meta.json: the fields a rerun must match for the sample to be kept."""
    return {
        "index": meta["index"], "prompt": meta["prompt"], "seed": meta["seed"], "generator": meta["generator"],
        "options": {k: v for k, v in meta["options"].items() if k not in IGNORED_OPTIONS},
        "weights": {name: w["sha256"] for name, w in meta["weights"].items()},
    }  # fmt: skip


def _is_radiograph(meta: dict[str, Any]) -> bool:
    return meta.get("generator") in GENERATORS


CXR_SAMPLES = SampleKind(request_of, accepts=_is_radiograph, example="out/cxr")


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output directory medsyn must not write radiographs into (`SampleKind.check_out_dir`)."""
    CXR_SAMPLES.check_out_dir(out_dir, overwrite)


def write_cxr_samples(
    out_dir: str | os.PathLike,
    metas: Sequence[dict],
    make: MakeBatch,
    batch_size: int = 1,
    overwrite: bool = False,
    steps: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> Path:
    """Make the samples `metas` (each with index, prompt, seed, generator, options, weights) in batches with
    `make` (one `CXRSample` per meta) and write OUT/<index>/ as each batch finishes; see the module docstring
    for what is kept, replaced or refused. progress: tqdm bars over samples and the `steps` (tokens) of a
    batch (None: on a terminal)."""
    return write_samples(CXR_SAMPLES, out_dir, metas, make, write_sample, max(1, int(batch_size)), overwrite,
                         steps, step_unit=("tokens", "tok"), log=log, progress=progress)  # fmt: skip
