"""The (report, image) pairs of an align run, from either kind of cache, behind one interface.

A CT cache (`medsyn prepare`, `medsyn.data.cache`) gives each subject's base-resolution 4-channel volume
(`lr.npy`, (4, D, H, W)); a radiograph cache (`medsyn drr`, `medsyn prepare --cxr`,
`medsyn.radiograph.cache`) gives its frontal image (`image.npy`, (1, H, W)). `PairCache` reads the
manifest's kind once and then offers what the align stage and the codebook need in the same way for
both: the rows of a split, a subject's image, a dataset and a datamodule whose batches are
`{"x": (B, C, *S), "text": list[str], "id": list[str]}`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from medsyn.data.cache import MANIFEST_FILE, load_array, read_cache_manifest
from medsyn.data.datamodule import BaseDataModule, BaseDataset, CacheDataModule
from medsyn.errors import DataError
from medsyn.radiograph.cache import load_image, read_radiograph_manifest
from medsyn.radiograph.datamodule import RadiographDataModule, RadiographDataset

KINDS = {"ct": (3, 4), "radiograph": (2, 1)}  # cache kind -> (spatial_dims, channels) of its images


def cache_kind(root: str | os.PathLike) -> str:
    """The kind of the cache at `root`: "radiograph" when its manifest.csv is a radiograph cache's (an
    `image` column), "ct" when it is a CT cache's (an `lr` column); else a DataError naming the file."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: no cache manifest; prepare the data first (`medsyn prepare` or `medsyn drr`)"
        )
    try:
        with open(path, newline="", encoding="utf-8") as f:
            columns = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from err
    if "image" in columns:
        return "radiograph"
    if "lr" in columns:
        return "ct"
    raise DataError(
        f"{path}: neither a CT cache (an `lr` column) nor a radiograph cache (an `image` column); "
        f"columns {columns}"
    )


@dataclass(frozen=True)
class PairCache:
    """A prepared cache as the align stage reads it: `kind` "ct" or "radiograph" (`cache_kind`)."""

    root: Path
    kind: str

    @classmethod
    def open(cls, root: str | os.PathLike) -> PairCache:
        return cls(Path(root), cache_kind(root))

    @property
    def spatial_dims(self) -> int:
        """3 for CT volumes, 2 for radiographs."""
        return KINDS[self.kind][0]

    @property
    def channels(self) -> int:
        """4 for CT volumes (the encoded channels), 1 for radiographs."""
        return KINDS[self.kind][1]

    def rows(self, split: str | None = None) -> list[dict]:
        """The manifest rows (paths absolute), only `split`'s when given."""
        if self.kind == "radiograph":
            return read_radiograph_manifest(self.root, split)
        rows = read_cache_manifest(self.root)
        return [r for r in rows if split is None or r["split"] == split]

    def source(self, row: dict) -> str:
        """The file of a row's image: `image.npy` of a radiograph, `lr.npy` of a CT volume."""
        return row["image"] if self.kind == "radiograph" else row["lr"]

    def load(self, row: dict) -> np.ndarray:
        """A row's image (C, *S): the radiograph (1, H, W) float32, or the base-resolution CT volume
        (4, D, H, W) memory-mapped in the cache's dtype."""
        return load_image(row) if self.kind == "radiograph" else load_array(row["lr"])

    def dataset(self, rows: list[dict], text: str = "both") -> Dataset:
        """Items {"x": (C, *S) float32, "text", "id"} of `rows`, with Findings, Impression or both."""
        return RadiographDataset(rows, text) if self.kind == "radiograph" else BaseDataset(rows, text)

    def datamodule(
        self, batch_size: int, num_workers: int = 0, seed: int = 0, text: str = "both"
    ) -> CacheDataModule:
        """The split-aware datamodule of this cache (`RadiographDataModule` or `BaseDataModule`)."""
        kind = RadiographDataModule if self.kind == "radiograph" else BaseDataModule
        return kind(self.root, batch_size, num_workers, seed, text)
