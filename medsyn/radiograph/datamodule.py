"""Batches of a radiograph cache (`medsyn.radiograph.cache`), in the base stage's layout.

`RadiographDataModule` yields `{"x": (B, 1, S, S) float32 in [-1, 1], "text": list[str], "id": list[str]}`,
the keys `BaseDataModule` gives for CT stacks, so 2D stages (alignment, VQ-GAN, the radiograph
generators) reuse the same splits, resumable sampler and seeded loaders.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from medsyn.data.datamodule import CacheDataModule, report_text, split_key
from medsyn.errors import DataError
from medsyn.radiograph.cache import load_image, read_radiograph_manifest


class RadiographDataset(Dataset):
    """Radiographs with their report text."""

    def __init__(self, rows: list[dict], text: str = "both", size: int | None = None) -> None:
        report_text({"findings": "", "impression": ""}, text)  # validates `text`
        self.rows, self.text, self.size = rows, text, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, _ = split_key(key)
        row = self.rows[index]
        image = load_image(row)  # (1, S, S)
        if self.size is not None and image.shape[1:] != (self.size,) * 2:
            raise DataError(
                f"{row['image']}: shape {image.shape[1:]} does not match the configured size {self.size}"
            )
        return {"x": torch.from_numpy(image), "text": report_text(row, self.text), "id": row["id"]}


class RadiographDataModule(CacheDataModule):
    """Radiograph-cache data: `image.npy` plus Findings, Impression or both."""

    def __init__(self, root, batch_size: int = 1, num_workers: int = 0, seed: int = 0, text: str = "both",
                 size: int | None = None) -> None:  # fmt: skip
        super().__init__(root, batch_size, num_workers, seed)
        report_text({"findings": "", "impression": ""}, text)
        self.text, self.size = text, size

    def read_rows(self) -> list[dict]:
        return read_radiograph_manifest(self.root)

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        return RadiographDataset(rows, self.text, self.size)
