"""Load a trained run directory for sampling: its config, its EMA weights and the grid it generates on.

A run directory (see DESIGN.md) holds `config.yaml`, `checkpoints/last.ckpt` and `model.safetensors`;
sampling needs only the safetensors file, whose metadata carries the merged run config. Errors name
the run directory or file and say what was expected.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsyn.data.nifti import spacing_affine
from medsyn.errors import DataError
from medsyn.training.export import WEIGHTS_FILE, load_weights, sha256_file, split_state

LR_FACTOR = 4  # the cache's low-resolution stack is every 4th voxel of the high-resolution one


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape (I, J, K), spacing in mm and the RAS affine of the written NIfTI files."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str = ""

    def coarsen(self, factor: int) -> Grid:
        """The grid of every `factor`-th voxel (voxel 0 shared), as the cache's low-resolution stack."""
        affine = self.affine.copy()
        affine[:3, :3] *= factor
        shape = tuple(-(-s // factor) for s in self.shape)
        return Grid(shape, tuple(s * factor for s in self.spacing), affine, self.source)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing),
            "affine": np.asarray(self.affine).round(6).tolist(),
            "source": self.source,
        }


@dataclass
class LoadedRun:
    """A run ready to sample: `denoiser` (x0-denoiser wrapping the UNet), `text` (base only) and the
    high-resolution grid of its data (`hr_grid`; the base stage generates on `hr_grid.coarsen(factor)`)."""

    run_dir: Path
    stage: str
    config: dict
    denoiser: torch.nn.Module
    text: torch.nn.Module | None
    weights: Path
    sha256: str
    hr_grid: Grid
    factor: int = LR_FACTOR
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> Grid:
        """The grid this stage generates on: low resolution for base, high resolution for SR."""
        return self.hr_grid.coarsen(self.factor) if self.stage == "base" else self.hr_grid

    @property
    def lowres_noise(self) -> float:
        """The noise-augmentation level of the low-resolution input at sampling (SR only)."""
        return float(self.config.get("diffusion", {}).get("lowres_noise_sample", 0.0) or 0.0)

    def provenance(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "weights": str(self.weights),
            "sha256": self.sha256,
            "stage": self.stage,
            "global_step": self.config.get("global_step"),
            "model": self.config.get("model"),
        }


def _manifest_grid(root: Path) -> tuple[Grid, int] | None:
    """The hr grid and lr factor from a prepared cache's manifest, or None when there is none."""
    from medsyn.data.cache import read_cache_manifest

    if not (root / "manifest.csv").is_file():
        return None
    rows = read_cache_manifest(root)
    if not rows or not rows[0].get("size"):
        return None
    size, lr_size = int(rows[0]["size"]), int(rows[0].get("lr_size") or 0)
    spacing = float(rows[0].get("spacing_mm") or 1.0)
    factor = size // lr_size if lr_size else LR_FACTOR
    shape = (size,) * 3
    return Grid(shape, (spacing,) * 3, spacing_affine(spacing, shape), f"cache {root}"), factor


def run_grid(config: dict, stage: str) -> tuple[Grid, int]:
    """The high-resolution grid of a run's data and its lr factor, from the most specific record:

    1. `config["grid"]` ({size, spacing_mm, lr_factor}) when a run records it;
    2. the manifest of the cache at `data.root` (the spacing the run was really trained at);
    3. `data.phantoms` ({size, spacing_mm}) when the run generated its own phantom data;
    4. paper scale: 4x the base preset's size (64 -> 256) at 1 mm.
    """
    data = config.get("data") or {}
    if config.get("grid"):
        g = config["grid"]
        size, spacing = int(g["size"]), float(g.get("spacing_mm", 1.0))
        shape = (size,) * 3
        factor = int(g.get("lr_factor", LR_FACTOR))
        return Grid(shape, (spacing,) * 3, spacing_affine(spacing, shape), "run config"), factor
    if data.get("root"):
        found = _manifest_grid(Path(data["root"]))
        if found is not None:
            return found
    phantoms = data.get("phantoms") or {}
    if phantoms.get("size"):
        size = int(phantoms["size"])
        spacing = float(phantoms.get("spacing_mm") or 256.0 / size)
        shape = (size,) * 3
        return Grid(shape, (spacing,) * 3, spacing_affine(spacing, shape), "data.phantoms"), LR_FACTOR
    from medsyn.nn.presets import DEFAULT_SIZE

    preset = (config.get("model") or {}).get("preset", "")
    size = DEFAULT_SIZE.get(preset, 64) * (LR_FACTOR if stage == "base" else 1)
    shape = (size,) * 3
    return Grid(shape, (1.0,) * 3, spacing_affine(1.0, shape), "default (1 mm)"), LR_FACTOR


def load_run(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu", stage: str | None = None
) -> LoadedRun:
    """Build the denoiser (and the base stage's text conditioner) of `run_dir` from its EMA weights.

    `stage` ("base" / "sr"), when given, must match the run's. Errors name the directory or file.
    """
    from medsyn.training.module import DiffusionModule

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{run_dir}: not a trained run directory (no {WEIGHTS_FILE}); train it with train.py")
    state, config = load_weights(weights)
    run_stage = config.get("stage")
    if run_stage not in ("base", "sr"):
        raise DataError(f"{weights}: unknown stage {run_stage!r} in the weights' metadata")
    if stage is not None and run_stage != stage:
        raise DataError(f"{run_dir}: is a '{run_stage}' run, expected a '{stage}' run here")
    try:
        module = DiffusionModule(
            stage=run_stage,
            model=config["model"],
            diffusion=config.get("diffusion", {}),
            optim={},
            text=config.get("text") if run_stage == "base" else None,
        )
        module.denoiser.net.load_state_dict(split_state(state, "net"))
        if module.text is not None:
            module.text.load_state_dict(split_state(state, "text"))
    except (KeyError, RuntimeError) as err:
        raise DataError(f"{weights}: weights do not match the run's config ({err})") from err
    hr_grid, factor = run_grid(config, run_stage)
    denoiser = module.denoiser.to(device).eval().requires_grad_(False)
    text = module.text.to(device) if module.text is not None else None
    return LoadedRun(
        run_dir, run_stage, config, denoiser, text, weights, sha256_file(weights), hr_grid, factor
    )


def package_versions() -> dict[str, str]:
    """Versions of the packages a sample depends on (provenance in meta.json)."""
    out = {"python": platform.python_version()}
    for name in ("medsyn", "torch", "monai", "numpy", "nibabel", "transformers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
