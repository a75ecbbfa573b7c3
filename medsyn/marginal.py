"""Marginalized sampling (MedSyn IV.D, V.D): generate some channels while others are held fixed.

`--fix CHANNEL=PATH` files are read, validated (natural units: HU, lobe labels 0..5, binary masks),
brought onto the run's grid with the same MONAI chain as `medsyn prepare`, and encoded. At every
sampler step `HoldFixed` replaces the fixed channels by their forward-noised value
alpha_t x_fixed + sigma_t eps (fresh eps from each sample's generator), and by x_fixed itself at t = 0,
so a fixed channel comes back exactly as given. `sample_resampled` adds RePaint's resampling rounds
(Lugmayr et al., 2022): re-noise one step and denoise it again, so the free channels settle in
harmony with the fixed ones. Fixing `ct` alone turns the model into a segmenter (`segment_with_model`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medsyn.data.cache import downsample
from medsyn.data.channels import CHANNELS, HU_MIN, NUM_LOBE_LABELS, encode_channel
from medsyn.data.nifti import load_nifti
from medsyn.diffusion import randn_per_sample, sample
from medsyn.errors import DataError
from medsyn.inference import Grid
from medsyn.training.export import sha256_file


def parse_fix(specs: Sequence[str]) -> dict[str, Path]:
    """`["lobes=a.nii.gz", ...]` -> {"lobes": Path("a.nii.gz")}; unknown or repeated channels are errors."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise DataError(
                f"--fix {spec!r}: expected CHANNEL=PATH with CHANNEL one of {', '.join(CHANNELS)}"
            )
        if name not in CHANNELS:
            raise DataError(
                f"--fix {spec!r}: unknown channel {name!r}; expected one of {', '.join(CHANNELS)}"
            )
        if name in out:
            raise DataError(f"--fix: channel {name!r} given twice ({out[name]} and {path}); give each once")
        out[name] = Path(path)
    return out


def _show(values: np.ndarray) -> list:
    """Up to five values for a message, integers shown as integers."""
    return [int(v) if float(v).is_integer() else round(float(v), 3) for v in values[:5]]


def validate_channel(name: str, values: np.ndarray, path: str | os.PathLike) -> None:
    """Check a volume holds what channel `name` expects, in natural units; errors name the file."""
    if not np.isfinite(values).all():
        raise DataError(
            f"{path}: {int((~np.isfinite(values)).sum())} NaN or infinite voxels in the {name} volume"
        )
    lo, hi = float(values.min()), float(values.max())
    if name == "ct":
        if lo >= -2.0 and hi <= 2.0:
            raise DataError(
                f"{path}: ct values in [{lo:g}, {hi:g}] look normalized; expected Hounsfield units"
            )
        if lo < -4096 or hi > 32767:
            raise DataError(
                f"{path}: ct values in [{lo:g}, {hi:g}]; expected Hounsfield units in [-4096, 32767]"
            )
    elif name == "lobes":
        bad = np.setdiff1d(np.unique(values), np.arange(NUM_LOBE_LABELS + 1))
        if bad.size:
            raise DataError(f"{path}: lobes labels {_show(bad)} found; expected integer labels 0..5 only")
    else:
        bad = np.setdiff1d(np.unique(values), [0, 1])
        if bad.size:
            raise DataError(f"{path}: {name} mask has values {_show(bad)}; expected a binary mask of 0 and 1")


def _on_grid(shape: Sequence[int], affine: np.ndarray, grid: Grid) -> bool:
    """True when a volume already lies on `grid`: same shape, RAS axes and spacing."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return (
        tuple(shape) == tuple(grid.shape)
        and nib.aff2axcodes(affine) == ("R", "A", "S")
        and np.allclose(spacing, grid.spacing, rtol=1e-3)
    )


def bring_to_grid(
    name: str, values: np.ndarray, affine: np.ndarray, grid: Grid, path: str | os.PathLike,
    hr_grid: Grid | None = None, factor: int = 1,
) -> tuple[np.ndarray, str]:  # fmt: skip
    """`values` on `grid`, and how it got there: as is, every `factor`-th voxel of `hr_grid`
    (the cache's own downsampling), or resampled by the `medsyn prepare` chain (RAS, spacing, crop/pad)."""
    if _on_grid(values.shape, affine, grid):
        return values, "on the run's grid"
    if hr_grid is not None and factor > 1 and _on_grid(values.shape, affine, hr_grid):
        return downsample(values[None], factor)[
            0
        ], f"every {factor}th voxel of the run's high-resolution grid"
    from medsyn.data.preprocess import PreprocessConfig, to_grid

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.asarray(values.shape) * spacing
    target = np.asarray(grid.shape) * np.asarray(grid.spacing)
    if np.any(extent < 0.5 * target) or np.any(extent > 4.0 * target) or min(values.shape) < 2:
        raise DataError(
            f"{path}: shape {tuple(values.shape)} at {np.round(spacing, 3).tolist()} mm covers "
            f"{np.round(extent).tolist()} mm, cannot be brought onto the run's grid of {list(grid.shape)} voxels "
            f"at {list(grid.spacing)} mm ({np.round(target).tolist()} mm); expected a volume covering "
            "about the same field of view, or one on the run's grid"
        )
    cfg = PreprocessConfig(size=tuple(grid.shape), spacing_mm=tuple(grid.spacing))
    if name == "ct":
        out, _, _ = to_grid(values, affine, {}, cfg)
    else:
        _, masks, _ = to_grid(np.full(values.shape, HU_MIN, np.float32), affine, {name: values}, cfg)
        out = masks[name]
    return out, f"resampled from {list(values.shape)} at {np.round(spacing, 4).tolist()} mm"


@dataclass
class FixedChannels:
    """Channels held fixed, in natural units on the output grid, with their provenance."""

    values: dict[str, np.ndarray]  # name -> (I, J, K) on `grid`
    grid: Grid
    sources: dict[str, dict] = field(default_factory=dict)

    @property
    def index(self) -> list[int]:
        """Channel indices (in CHANNELS order) of the fixed channels."""
        return [CHANNELS.index(n) for n in CHANNELS if n in self.values]

    def encoded(self, factor: int = 1) -> torch.Tensor:
        """The fixed channels in the diffusion range (1, k, *S), every `factor`-th voxel for the base stage."""
        planes = [
            np.asarray(encode_channel(n, self.values[n]), np.float32) for n in CHANNELS if n in self.values
        ]
        stack = np.stack(planes)
        return torch.from_numpy(downsample(stack, factor) if factor > 1 else stack)[None]

    def meta(self) -> dict[str, dict]:
        return self.sources


Raw = dict[str, tuple[np.ndarray, np.ndarray, Path]]  # channel -> (values, affine, path)


def read_fixed(specs: Mapping[str, str | os.PathLike]) -> Raw:
    """Read and validate each `--fix` file (channel -> path) in natural units, before any model loads."""
    raw: Raw = {}
    for name, path in specs.items():
        if name not in CHANNELS:
            raise DataError(f"--fix {name}={path}: unknown channel; expected one of {', '.join(CHANNELS)}")
        array, affine = load_nifti(path, dtype=np.float32)
        validate_channel(name, array, path)
        raw[name] = (array, affine, Path(path))
    return raw


def load_fixed(
    specs: Mapping[str, str | os.PathLike] | Raw, grid: Grid, hr_grid: Grid | None = None, factor: int = 1
) -> FixedChannels:
    """Fixed channels on `grid` (the output grid) from `--fix` files (channel -> path) or `read_fixed`."""
    raw = specs if all(isinstance(v, tuple) for v in specs.values()) else read_fixed(specs)  # type: ignore[arg-type]
    values, sources = {}, {}
    for name, (array, affine, path) in raw.items():
        array, how = bring_to_grid(name, array, affine, grid, path, hr_grid, factor)
        if name != "ct":
            array = np.rint(array).astype(np.uint8)
        values[name] = array
        sources[name] = {"path": str(path.resolve()), "sha256": sha256_file(path), "grid": how}
    return FixedChannels(values, grid, sources)


class HoldFixed:
    """The samplers' `project(x, t)` hook: fixed channels <- alpha_t x_fixed + sigma_t eps, or x_fixed at t = 0.

    values: (1 | B, k, *S) encoded fixed channels; index: their k channel indices in x.
    eps is drawn from `generators` (one per sample), so a sample stays independent of its batch.
    """

    def __init__(
        self, values: torch.Tensor, index: Sequence[int], schedule, generators: Sequence[torch.Generator]
    ) -> None:
        self.values, self.index = values, list(index)
        self.schedule, self.generators = schedule, list(generators)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        fixed = self.values.to(device=x.device, dtype=x.dtype).expand(b, *self.values.shape[1:])  # (B, k, *S)
        x = x.clone()
        if bool((t <= 0).all()):
            x[:, self.index] = fixed
            return x
        noise = randn_per_sample(fixed.shape, self.generators, x.device, x.dtype)
        x[:, self.index] = self.schedule.add_noise(fixed, t.to(x.device), noise)
        return x


def renoise(
    x_s: torch.Tensor, t: float, s: float, schedule, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """A draw of q(x_t | x_s) for t > s: x_t = (alpha_t / alpha_s) x_s + sigma_{t|s} z (VDM notation)."""
    alpha_t, sigma_t = (float(v) for v in schedule.alpha_sigma(float(t)))
    alpha_s, sigma_s = (float(v) for v in schedule.alpha_sigma(float(s)))
    a = alpha_t / alpha_s
    std = math.sqrt(max(sigma_t**2 - a**2 * sigma_s**2, 0.0))
    return a * x_s + std * randn_per_sample(x_s.shape, generators, x_s.device, x_s.dtype)


@torch.no_grad()
def sample_resampled(
    name: str,
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule,
    generators: Sequence[torch.Generator] | None = None,
    project: Callable | None = None,
    rounds: int = 0,
) -> torch.Tensor:
    """Run sampler `name` over `ts` with RePaint rounds: after each step t -> s (but the last), re-noise
    to t and take the step again, `rounds` times. Each step is a single-step call of the sampler, so a
    multistep solver (dpmpp-2m) acts as its first-order form (DDIM) here; use ancestral as RePaint does."""
    if rounds <= 0:
        return sample(name, denoise, noise, ts, schedule, generators=generators, project=project)
    times = [float(v) for v in ts]
    x = noise
    for t, s in zip(times[:-1], times[1:], strict=True):
        step = torch.tensor([t, s], dtype=ts.dtype)
        for r in range(rounds + 1):
            x_s = sample(name, denoise, x, step, schedule, generators=generators, project=project)
            if r == rounds or s <= 0.0:
                break
            x = renoise(x_s, t, s, schedule, generators)
        x = x_s
    return x


def segment_with_model(
    base, ct_hu: np.ndarray, sr=None, prompt: str = "", seed: int = 0, **options
) -> dict[str, np.ndarray]:
    """Lobes, airway and vessels of a CT (HU, on the output grid: the SR run's grid with `sr`, else the
    base grid) by sampling them with the CT held fixed (paper Table V). `options` go to `SampleOptions`."""
    from medsyn.data.channels import decode_volume
    from medsyn.pipeline import SampleOptions, synthesize

    grid = sr.grid if sr is not None else base.grid
    if tuple(ct_hu.shape) != tuple(grid.shape):
        raise DataError(f"segment_with_model: CT of shape {ct_hu.shape}, expected the grid {grid.shape}")
    fixed = FixedChannels({"ct": np.asarray(ct_hu, np.float32)}, grid, {"ct": {"path": "<array>"}})
    opts = SampleOptions(**{"guidance": 1.0, **options})
    x = synthesize(base, sr, [prompt], [seed], opts, fixed)[0].numpy()  # (4, *S)
    out = decode_volume(x)
    return {k: out[k] for k in ("lobes", "airway", "vessels")}
