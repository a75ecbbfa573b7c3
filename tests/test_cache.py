"""The prepared-data cache: downsampling, hashed splits, subject files and the manifest."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medsyn.data import channels
from medsyn.data.cache import (
    FAILED_COLUMNS,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    downsample,
    finished_subjects,
    is_done,
    load_array,
    read_cache_manifest,
    read_meta,
    split_for,
    write_failed,
    write_manifest,
    write_subject,
)
from medsyn.errors import ConfigError, DataError


def subject(seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray, dict]:
    """An hr (4, S, S, S) stack in [-1, 1] (lobes: labels' levels), its lr (4, S/4, S/4, S/4) and a meta
    with a report."""
    rng = np.random.default_rng(seed)
    hr = rng.uniform(-1, 1, (4, size, size, size)).astype(np.float32)
    hr[1] = channels.encode_lobes(rng.integers(0, 6, (size,) * 3))
    meta = {"findings": f"Finding {seed}.", "impression": "Normal.", "size": size, "lr_size": size // 4,
            "spacing_mm": 2.0, "source": f"/data/{seed}.nii.gz"}  # fmt: skip
    return hr, downsample(hr), meta


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_downsample_averages_blocks_and_takes_the_lobe_majority():
    hr = np.arange(4 * 8 * 12 * 4, dtype=np.float32).reshape(4, 8, 12, 4) / (4 * 8 * 12 * 4)  # (C, 8, 12, 4)
    labels = np.zeros((8, 12, 4), np.uint8)
    labels[4:, :4] = 5
    labels[4:, :4, 0] = 3  # a quarter of the block right upper, the rest right lower
    hr[1] = channels.encode_lobes(labels)
    lr = downsample(hr, 4)
    assert lr.shape == (4, 2, 3, 1) and lr.flags.c_contiguous and lr.dtype == np.float32
    np.testing.assert_allclose(lr[2, 1, 2, 0], hr[2, 4:8, 8:12, 0:4].mean(), rtol=1e-6)  # the block's mean
    assert lr[2, 1, 2, 0] != hr[2, 4, 8, 0]  # (MedSyn's every 4th voxel)
    np.testing.assert_array_equal(channels.decode_lobes(lr[1, :, :, 0]), [[0, 0, 0], [5, 0, 0]])  # majority
    assert set(np.unique(lr[1])) <= set(channels.LOBE_LEVELS)  # a label's level, never a mean of levels


def test_split_is_stable_and_roughly_proportional():
    ids = [f"ct_{i:04d}" for i in range(2000)]
    splits = [split_for(i) for i in ids]
    assert splits == [split_for(i) for i in ids]  # a hash of the id, not a random draw
    counts = Counter(splits)
    assert abs(counts["train"] / 2000 - 0.8) < 0.04 and abs(counts["val"] / 2000 - 0.1) < 0.03
    assert abs(counts["test"] / 2000 - 0.1) < 0.03
    assert {split_for(i, (0.75, 0.25, 0.0)) for i in ids} == {"train", "val"}  # a zero fraction: never
    assert {split_for(i, (1, 1, 1), salt="other") for i in ids[:50]} == {"train", "val", "test"}


@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.8, -0.1, 0.3), (0.0, 0.0, 0.0)])
def test_bad_fractions_raise(fractions):
    with pytest.raises(ConfigError, match="split fractions"):
        split_for("ct_0001", fractions)


def test_subject_round_trip(tmp_path):
    hr, lr, meta = subject(0)
    assert not is_done(tmp_path, "ct_0")
    path = write_subject(tmp_path, "ct_0", hr, lr, meta)
    assert path == tmp_path / "ct_0" and is_done(tmp_path, "ct_0")
    assert read_meta(tmp_path, "ct_0") == {**meta, "encoding": channels.ENCODING}  # recorded
    assert (path / "report.txt").read_text() == "Findings: Finding 0.\n\nImpression: Normal.\n"
    cached = load_array(path / "hr.npy")
    assert cached.dtype == np.float16 and isinstance(cached, np.memmap) and cached.shape == hr.shape
    np.testing.assert_allclose(cached, hr, atol=1e-3)  # float16 keeps ~3 decimals in [-1, 1]
    np.testing.assert_allclose(load_array(path / "lr.npy", mmap=False), downsample(hr), atol=1e-3)
    with pytest.raises(FileExistsError):
        write_subject(tmp_path, "ct_0", hr, lr, meta)  # a finished subject is kept unless overwrite


def test_unreadable_subject_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="ct_9"):
        read_meta(tmp_path, "ct_9")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="bad.npy"):
        load_array(tmp_path / "bad.npy")


def test_manifest_lists_finished_subjects_with_relative_paths(tmp_path):
    for i in range(3):
        write_subject(tmp_path, f"ct_{i}", *subject(i))
    (tmp_path / ".ct_3.abc.tmp").mkdir()  # an interrupted subject is not listed
    rows = write_manifest(tmp_path)
    columns, on_disk = read_csv(tmp_path / MANIFEST_FILE)
    assert columns == list(MANIFEST_COLUMNS) and [r["id"] for r in on_disk] == ["ct_0", "ct_1", "ct_2"]
    assert on_disk[1]["hr"] == "ct_1/hr.npy" and on_disk[1]["lr"] == "ct_1/lr.npy"
    assert on_disk[1]["split"] == split_for("ct_1") and on_disk[1]["findings"] == "Finding 1."
    assert {r["encoding"] for r in on_disk} == {channels.ENCODING}
    assert [r["id"] for r in rows] == finished_subjects(tmp_path)
    read = read_cache_manifest(tmp_path)
    assert Path(read[2]["hr"]) == tmp_path / "ct_2" / "hr.npy"  # resolved against the cache directory
    assert load_array(read[2]["lr"]).shape == (4, 2, 2, 2)


def test_read_cache_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="no cache manifest"):
        read_cache_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("id,hr\nct_0,ct_0/hr.npy\n")
    with pytest.raises(DataError, match="missing column"):
        read_cache_manifest(tmp_path)


def test_a_cache_of_an_earlier_encoding_is_refused_naming_the_file(tmp_path):
    for i in range(2):
        write_subject(tmp_path, f"ct_{i}", *subject(i))
    write_manifest(tmp_path)
    manifest = tmp_path / MANIFEST_FILE
    columns, rows = read_csv(manifest)
    old = [c for c in columns if c != "encoding"]  # medsyn-1 wrote no encoding column
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError) as info:
        read_cache_manifest(tmp_path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(manifest) in message and "medsyn-1" in message
    assert "prepare" in message and channels.ENCODING in message
    meta_path = tmp_path / "ct_1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["encoding"]  # a subject of medsyn-1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError) as info:
        write_manifest(tmp_path)
    assert len(str(info.value).splitlines()) == 1 and str(meta_path) in str(info.value)
    meta["encoding"] = "medsyn-0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="'medsyn-0'"):
        write_manifest(tmp_path)


def test_write_failed(tmp_path):
    failures = [{"id": "ct_7", "source": "/data/7.nii.gz", "reason": "no lungs, found", "extra": 1}]
    write_failed(tmp_path, failures)
    columns, rows = read_csv(tmp_path / "failed.csv")
    assert columns == list(FAILED_COLUMNS)
    assert rows == [{"id": "ct_7", "source": "/data/7.nii.gz", "reason": "no lungs, found"}]  # quoted comma
