"""DataModules over the cache: batch shapes, text modes, SR crops matching the upsampled lr, seeding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from medsyn.data import cache
from medsyn.data.datamodule import BaseDataModule, SRDataModule, report_text, upsampled_crop
from medsyn.data.grid import upsample
from medsyn.data.resumable import ResumableSampler
from medsyn.errors import ConfigError, DataError

SPLIT = {"s0": "train", "s1": "train", "s2": "train", "s3": "train", "s4": "val", "s5": "test"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A cache of six 16^3 subjects (lr 4^3) with known splits."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    for i, sid in enumerate(SPLIT):
        hr = rng.uniform(-1, 1, (4, 16, 16, 16)).astype(np.float32)
        meta = {"findings": f"Findings {i}.", "impression": f"Impression {i}.", "size": 16, "lr_size": 4}
        cache.write_subject(root, sid, hr, cache.downsample(hr, 4), meta)
    rows = cache.write_manifest(root)
    for row in rows:
        row["split"] = SPLIT[row["id"]]
    with open(root / cache.MANIFEST_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cache.MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_base_batches(root: Path):
    dm = BaseDataModule(root, batch_size=2, text="both", size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (2, 4, 4, 4, 4) and batch["x"].dtype == torch.float32
    assert (
        len(batch["text"]) == 2
        and batch["text"][0].startswith("Findings")
        and "Impression" in batch["text"][0]
    )
    assert set(batch["id"]) <= {"s0", "s1", "s2", "s3"}
    (val,) = list(dm.val_dataloader())
    assert val["id"] == ["s4"] and val["text"] == ["Findings 4. Impression 4."]
    np.testing.assert_array_equal(val["x"][0].numpy(), np.load(root / "s4" / "lr.npy").astype(np.float32))


def test_text_modes_and_size_check(root: Path):
    row = {"findings": "F.", "impression": "I."}
    assert [report_text(row, m) for m in ("findings", "impression", "both")] == ["F.", "I.", "F. I."]
    with pytest.raises(ConfigError, match="text"):
        BaseDataModule(root, text="summary")
    dm = BaseDataModule(root, size=8)
    dm.setup()
    with pytest.raises(DataError, match="configured size 8"):
        next(iter(dm.test_dataloader()))


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_upsampled_crop_equals_crop_of_full_upsampling(mode: str):
    lr = np.random.default_rng(1).normal(size=(2, 5, 6, 7)).astype(np.float32)
    full = upsample(torch.from_numpy(lr), 4, mode)
    assert full.shape == (2, 20, 24, 28)
    for corner in [(0, 0, 0), (3, 5, 2), (7, 9, 13), (12, 16, 20)]:
        crop = upsampled_crop(lr, corner, 8, 4, mode)
        a = corner
        np.testing.assert_allclose(
            crop, full[:, a[0] : a[0] + 8, a[1] : a[1] + 8, a[2] : a[2] + 8], atol=1e-6
        )


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_sr_batches_have_matching_crops(root: Path, mode: str):
    dm = SRDataModule(root, batch_size=2, crop_size=8, upsample=mode)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (2, 4, 8, 8, 8) and batch["lowres"].shape == (2, 4, 8, 8, 8)
    for x, lowres, sid in zip(batch["x"], batch["lowres"], batch["id"], strict=True):
        hr = np.load(root / sid / "hr.npy").astype(np.float32)
        full = upsample(torch.from_numpy(np.load(root / sid / "lr.npy").astype(np.float32)), 4, mode)
        # locate the crop in hr, then the same box must hold the upsampled lr
        hits = [
            (i, j, k)
            for i in range(9) for j in range(9) for k in range(9)
            if np.array_equal(hr[:, i : i + 8, j : j + 8, k : k + 8], x.numpy())
        ]  # fmt: skip
        assert len(hits) == 1
        i, j, k = hits[0]
        np.testing.assert_allclose(lowres, full[:, i : i + 8, j : j + 8, k : k + 8], atol=1e-3)


def test_sr_crops_are_seeded(root: Path):
    def first_batch(seed: int, workers: int) -> dict:
        dm = SRDataModule(root, batch_size=2, crop_size=8, seed=seed, num_workers=workers)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(3, 2), first_batch(3, 2)
    assert a["id"] == b["id"] and torch.equal(a["x"], b["x"])
    c = first_batch(4, 2)
    assert c["id"] != a["id"] or not torch.equal(c["x"], a["x"])
    dm = SRDataModule(root, crop_size=8)
    dm.setup()
    v1, v2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(v1["x"], v2["x"])  # evaluation crops do not change between epochs


def test_empty_split_and_bad_options(root: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="upsample"):
        SRDataModule(root, upsample="cubic")
    dm = SRDataModule(root, crop_size=32)
    dm.setup()
    with pytest.raises(ConfigError, match="crop_size=32 exceeds"):
        next(iter(dm.train_dataloader()))
    rows = list(csv.DictReader(open(root / cache.MANIFEST_FILE)))
    for row in rows:
        row["split"] = "train"
    (tmp_path / "s0").symlink_to(root / "s0")
    with open(tmp_path / cache.MANIFEST_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:1])
    dm = BaseDataModule(tmp_path)
    dm.setup()
    assert dm.val_dataloader() == [] and len(dm.train_dataloader()) == 1


def test_training_loader_starts_its_workers_at_the_first_batch(root: Path):
    # with workers, a DataLoader draws sampler indices at iter(); Lightning sets the epoch after that
    dm = BaseDataModule(root, batch_size=2, num_workers=1, seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    loader.sampler.set_epoch(3)
    expected = ResumableSampler(4, seed=5, batch_size=2)
    expected.set_epoch(3)
    rows = [r["id"] for r in cache.read_cache_manifest(root) if r["split"] == "train"]
    assert [i for batch in it for i in batch["id"]] == [rows[i] for i, _ in expected]
