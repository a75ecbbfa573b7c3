"""Fixed channels for marginalized sampling (MedSyn IV.D, V.D): the `--fix CHANNEL=PATH` files.

Each file is read, validated in natural units (HU, lobe labels 0..5, binary masks), brought onto the
run's grid with the same MONAI chain as `medsyn prepare`, and encoded. The samplers then hold these
channels with `medsyn.diffusion.HoldFixed`, so a fixed channel comes back exactly as given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medsyn.data.channels import CHANNELS, NUM_LOBE_LABELS, downsample, encode_channel
from medsyn.data.grid import Grid, bring_to_grid
from medsyn.data.nifti import load_nifti
from medsyn.errors import DataError
from medsyn.weights import sha256_file


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
        """The fixed channels in the diffusion range (1, k, *S), on the base grid (as the cache's base stack:
        block means, lobes by majority) when `factor` > 1."""
        names = [n for n in CHANNELS if n in self.values]
        stack = np.stack([np.asarray(encode_channel(n, self.values[n]), np.float32) for n in names])
        return torch.from_numpy(downsample(stack, factor, names))[None]

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
