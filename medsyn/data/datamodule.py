"""LightningDataModules over the prepared cache (see `medsyn.data.cache`).

- `BaseDataModule`: the low-resolution 4-channel stack (`lr.npy`, 64^3 at paper scale) and the report,
  batches `{"x": (B, 4, D, H, W) float32, "text": list[str], "id": list[str]}`.
- `SRDataModule`: random crops of the high-resolution stack (`hr.npy`) with the same crop of the
  low-resolution stack upsampled to the high-resolution grid (nearest or trilinear),
  batches `{"x": (B, 4, c, c, c), "lowres": (B, 4, c, c, c), "text": ..., "id": ...}`.

Arrays are memory-mapped: an SR item reads only its crop (and the matching lr block) from disk.
Splits come from the manifest's `split` column. Training crops are seeded by the resumable sampler's draw
id, evaluation crops by (seed, index); DataLoader workers are seeded by Lightning (`seed_everything`
with `workers=True`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medsyn.data.cache import SPLITS, load_array, read_cache_manifest
from medsyn.data.grid import UPSAMPLE_MODES, upsample
from medsyn.data.resumable import ResumableSampler
from medsyn.errors import ConfigError, DataError

TEXT_MODES = ("findings", "impression", "both")


def report_text(row: dict, text: str = "both") -> str:
    """The conditioning text of a manifest row: Findings, Impression, or both joined by a space."""
    if text not in TEXT_MODES:
        raise ConfigError(f"text={text!r}: expected one of {TEXT_MODES}")
    parts = [row["findings"], row["impression"]] if text == "both" else [row[text]]
    return " ".join(p.strip() for p in parts if p and p.strip())


def upsampled_crop(lr: np.ndarray, corner, crop: int, factor: int, mode: str = "nearest") -> torch.Tensor:
    """`upsample(lr)[:, box]` for the box at `corner` of side `crop`, reading only the lr block it needs.

    One lr voxel of margin on each side makes trilinear values equal to those of the full upsampling.
    """
    margin = 1 if mode == "trilinear" else 0
    lo = [max(a // factor - margin, 0) for a in corner]
    hi = [min((a + crop - 1) // factor + 1 + margin, n) for a, n in zip(corner, lr.shape[1:], strict=True)]
    block = torch.from_numpy(np.asarray(lr[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32))
    up = upsample(block, factor, mode)
    o = [a - low * factor for a, low in zip(corner, lo, strict=True)]
    return up[:, o[0] : o[0] + crop, o[1] : o[1] + crop, o[2] : o[2] + crop].contiguous()


class BaseDataset(Dataset):
    """Low-resolution stacks with their report text."""

    def __init__(self, rows: list[dict], text: str = "both", size: int | None = None) -> None:
        report_text({"findings": "", "impression": ""}, text)  # validates `text`
        self.rows, self.text, self.size = rows, text, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, _ = split_key(key)
        row = self.rows[index]
        lr = load_array(row["lr"])
        if self.size is not None and lr.shape[1:] != (self.size,) * 3:
            raise DataError(
                f"{row['lr']}: shape {lr.shape[1:]} does not match the configured size {self.size}"
            )
        x = torch.from_numpy(np.asarray(lr, dtype=np.float32))  # (4, D, H, W)
        return {"x": x, "text": report_text(row, self.text), "id": row["id"]}


class SRDataset(Dataset):
    """Random (or, with `random_crops=False`, seeded per index) crops of hr with the matching lowres crop."""

    def __init__(
        self,
        rows: list[dict],
        crop_size: int = 64,
        upsample_mode: str = "nearest",
        text: str = "both",
        random_crops: bool = True,
        seed: int = 0,
    ) -> None:
        if upsample_mode not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample={upsample_mode!r}: expected one of {UPSAMPLE_MODES}")
        self.rows, self.crop, self.mode, self.text = rows, crop_size, upsample_mode, text
        self.random_crops, self.seed = random_crops, seed

    def __len__(self) -> int:
        return len(self.rows)

    def _corner(self, index: int, draw: int | None, shape: tuple[int, ...]) -> list[int]:
        if self.random_crops and draw is None:
            return [int(torch.randint(0, n - self.crop + 1, ())) for n in shape]
        # seeded by the sampler's draw id (training) or the index (evaluation): reproducible
        rng = np.random.default_rng((self.seed, index) if draw is None else (self.seed, 1, draw))
        return [int(rng.integers(0, n - self.crop + 1)) for n in shape]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, draw = split_key(key)
        row = self.rows[index]
        hr, lr = load_array(row["hr"]), load_array(row["lr"])
        if min(hr.shape[1:]) < self.crop:
            raise ConfigError(
                f"crop_size={self.crop} exceeds the cached volume {hr.shape[1:]} of {row['id']}"
            )
        factor = hr.shape[1] // lr.shape[1]
        a = self._corner(index, draw if self.random_crops else None, hr.shape[1:])
        c = self.crop
        x = np.asarray(hr[:, a[0] : a[0] + c, a[1] : a[1] + c, a[2] : a[2] + c], dtype=np.float32)
        lowres = upsampled_crop(lr, a, c, factor, self.mode)
        return {
            "x": torch.from_numpy(x),
            "lowres": lowres,
            "text": report_text(row, self.text),
            "id": row["id"],
        }


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """Dataset keys are an index, or `(index, draw)` from `ResumableSampler` (draw seeds augmentation)."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


class DeferredDataLoader(DataLoader):
    """A DataLoader whose iteration starts at the first batch instead of at `iter()`.

    Lightning calls `iter()` on the training loader before it restores an interrupted epoch's progress
    and sets the sampler's epoch; with workers, a DataLoader asks its sampler for indices right at
    `iter()`. Deferring that lets the sampler see the epoch and progress Lightning settled on.
    """

    def __iter__(self) -> Iterator:
        return _Deferred(super().__iter__)


class _Deferred(Iterator):
    def __init__(self, start: Callable[[], Iterator]) -> None:
        self._start, self._it = start, None

    def __next__(self):
        if self._it is None:
            self._it = self._start()
        return next(self._it)


class CacheDataModule(pl.LightningDataModule):
    """Shared loading logic: manifest splits, seeded loaders; subclasses build the datasets."""

    collate_fn: Callable | None = None  # None: torch's default collation

    def __init__(
        self, root: str | os.PathLike, batch_size: int = 1, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        self.root, self.batch_size, self.num_workers, self.seed = root, batch_size, num_workers, seed
        self.datasets: dict[str, Dataset] = {}

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        raise NotImplementedError

    def read_rows(self) -> list[dict]:
        """The manifest rows of the cache (each with its `split`)."""
        return read_cache_manifest(self.root)

    def setup(self, stage: str | None = None) -> None:
        rows = self.read_rows()
        for split in SPLITS:
            self.datasets[split] = self.make_dataset([r for r in rows if r["split"] == split], split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if not self.datasets:
            self.setup()
        dataset = self.datasets[split]
        if len(dataset) == 0:
            return []  # Lightning skips an empty split
        sampler = None
        if shuffle:
            sampler = self._train_sampler(len(dataset))
            shuffle = False
        return (DeferredDataLoader if sampler is not None else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            drop_last=sampler is not None and len(dataset) >= self.batch_size,
        )

    def _train_sampler(self, n: int) -> ResumableSampler:
        """Order from (seed, epoch), split across ranks; after a mid-epoch resume, skip what was consumed."""
        trainer = self.trainer
        if trainer is None:
            return ResumableSampler(n, self.seed, shuffle=True, batch_size=self.batch_size)
        progress = trainer.fit_loop.epoch_loop.batch_progress

        def consumed() -> int:
            # asked when the epoch's first batch is fetched: by then Lightning has restored its loops and
            # counts the batches of this epoch already trained as `ready` (0 in a new epoch)
            return progress.current.ready * self.batch_size

        sampler = ResumableSampler(n, self.seed, trainer.global_rank, trainer.world_size, shuffle=True,
                                   batch_size=self.batch_size, consumed=consumed)  # fmt: skip
        sampler.set_epoch(trainer.current_epoch)
        return sampler

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


class BaseDataModule(CacheDataModule):
    """Base-model data: `lr.npy` stacks (64^3 at paper scale) plus Findings, Impression or both."""

    def __init__(self, root, batch_size: int = 1, num_workers: int = 0, seed: int = 0, text: str = "both",
                 size: int | None = None) -> None:  # fmt: skip
        super().__init__(root, batch_size, num_workers, seed)
        report_text({"findings": "", "impression": ""}, text)
        self.text, self.size = text, size

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        return BaseDataset(rows, self.text, self.size)


class SRDataModule(CacheDataModule):
    """SR-model data: random `crop_size`^3 crops of `hr.npy` with the upsampled `lr.npy` crop."""

    def __init__(self, root, batch_size: int = 1, num_workers: int = 0, seed: int = 0, crop_size: int = 64,
                 upsample: str = "nearest", text: str = "both") -> None:  # fmt: skip
        super().__init__(root, batch_size, num_workers, seed)
        if upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample={upsample!r}: expected one of {UPSAMPLE_MODES}")
        if crop_size < 1:
            raise ConfigError(f"crop_size={crop_size}: expected a positive size")
        self.crop_size, self.upsample, self.text = crop_size, upsample, text

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        return SRDataset(
            rows, self.crop_size, self.upsample, self.text, random_crops=split == "train", seed=self.seed
        )
