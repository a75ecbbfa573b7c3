"""Writing generated samples: the design's files per sample, written atomically, with provenance."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import torch

from medsyn.data.channels import decode_volume
from medsyn.data.grid import Grid
from medsyn.data.nifti import save_nifti
from medsyn.errors import DataError
from medsyn.generation.fixed import FixedChannels
from medsyn.generation.stages import SR_SEED_OFFSET, SampleOptions, synthesize
from medsyn.io import atomic_dir, write_json
from medsyn.viz import render_volume, save_png


def package_versions() -> dict[str, str]:
    """Versions of the packages a sample depends on (provenance in meta.json)."""
    out = {"python": platform.python_version()}
    for name in ("medsyn", "torch", "monai", "numpy", "nibabel", "transformers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_sample(directory: Path, x: torch.Tensor, grid: Grid, meta: dict) -> None:
    """Write one sample (4, *S) in the diffusion range as the design's files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = decode_volume(x.numpy())
    for name, array in arrays.items():
        save_nifti(directory / f"{name}.nii.gz", array, grid.affine, dtype=array.dtype)
    title = f"seed {meta['seed']}: {meta['prompt']}"
    save_png(directory / "preview.png", render_volume(x, spacing=grid.affine, title=title))
    write_json(directory / "meta.json", meta)


def run_sampling(
    base, sr, requests: Sequence[tuple[str, int]], options: SampleOptions, out_dir: str | Path,
    fixed: FixedChannels | None = None, overwrite: bool = False, log: Callable[[str], None] = print,
) -> Path:  # fmt: skip
    """Sample every (prompt, seed) request in batches and write `out_dir/<index>/` atomically.

    An existing non-empty `out_dir` is refused (before any work) unless `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
    if sr is not None and tuple(sr.grid.shape) != tuple(s * base.factor for s in base.grid.shape):
        raise DataError(
            f"{sr.run_dir}: SR grid {list(sr.grid.shape)} is not {base.factor}x the base grid "
            f"{list(base.grid.shape)} of {base.run_dir}; expected runs trained on the same cache"
        )
    if sr is not None and options.lowres_noise is not None:
        sr.model.conditioners["lowres"].check_level(options.lowres_noise, "--sr-noise")
    grid = sr.grid if sr is not None else base.grid
    common = {
        "sampler": options.sampler, "steps": options.steps, "guidance": options.guidance,
        "options": options.to_dict(), "fixed": fixed.meta() if fixed is not None else {},
        "weights": {"base": base.provenance(), **({"sr": sr.provenance()} if sr is not None else {})},
        "versions": package_versions(),
        "grid": {**grid.to_dict(), "stage": "sr" if sr is not None else "base"},
        "base_grid": base.grid.to_dict(),
        "device": str(base.model.device),
    }  # fmt: skip
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for start in range(0, len(requests), options.batch_size):
            batch = requests[start : start + options.batch_size]
            began = time.perf_counter()
            x = synthesize(base, sr, [p for p, _ in batch], [s for _, s in batch], options, fixed)
            seconds = (time.perf_counter() - began) / len(batch)
            for j, (prompt, seed) in enumerate(batch):
                index = start + j
                meta = {
                    "index": index,
                    "prompt": prompt,
                    "seed": seed,
                    **common,
                    "seconds": round(seconds, 3),
                }
                if sr is not None:
                    meta["sr_seed"] = seed + SR_SEED_OFFSET
                write_sample(tmp / str(index), x[j], grid, meta)
                log(
                    f"sample {index}: seed {seed}, {seconds:.1f} s, {list(grid.shape)} at {grid.spacing[0]:g} mm"
                )
    return out_dir
