"""Finding and reading evaluation inputs: sample folders, phantom folders, caches, manifests, NIfTI folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from training_fixtures import make_cache

from medsyn.data.channels import decode_volume
from medsyn.data.nifti import load_nifti, save_nifti, spacing_affine
from medsyn.data.phantom import generate_phantom, save_phantom, write_dataset
from medsyn.errors import DataError
from medsyn.evaluation.volumes import find_volumes, load_volume, read_truth


def make_sample_folder(root: Path, n: int = 3, size: int = 32, seed: int = 5, prompts=None) -> Path:
    """A folder laid out as sample.py writes it (`<index>/` with NIfTI files and meta.json)."""
    for i in range(n):
        phantom = generate_phantom(size, seed=[seed, i])
        folder = root / str(i)
        save_phantom(folder, phantom)
        (folder / "truth.json").unlink()
        (folder / "report.txt").unlink()
        prompt = prompts[i] if prompts else phantom.report.text()
        (folder / "meta.json").write_text(json.dumps({"index": i, "prompt": prompt, "seed": i}))
    return root


def test_phantom_folder_lists_subjects_with_masks_truth_and_report(tmp_path):
    root = write_dataset(tmp_path / "ph", 3, size=16, seed=1, progress=False)
    refs = find_volumes(root)
    assert [r.id for r in refs] == ["phantom_0000", "phantom_0001", "phantom_0002"]
    assert set(refs[0].masks) == {"lobes", "airway", "vessels"}
    assert refs[0].prompt.startswith("Findings:") and "Impression:" in refs[0].prompt
    assert read_truth(refs[0])["size"] == 16
    assert find_volumes(root / "manifest.csv")[1].id == "phantom_0001"  # the manifest given directly
    volume = load_volume(refs[0])
    hu, affine = load_nifti(root / "phantom_0000" / "ct.nii.gz")
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine, affine)
    np.testing.assert_allclose(volume.spacing, [16.0] * 3)
    assert volume.masks["lobes"].dtype == np.uint8 and volume.masks["lobes"].max() == 5


def test_sample_folder_in_numeric_order_with_prompts(tmp_path):
    root = make_sample_folder(tmp_path / "s", n=3, size=16, prompts=["a", "b", "c"])
    (root / "10").mkdir()  # not a sample: no ct.nii.gz
    (root / "notes.txt").write_text("kept")
    refs = find_volumes(root)
    assert [r.id for r in refs] == ["0", "1", "2"]
    assert [r.prompt for r in refs] == ["a", "b", "c"]
    assert set(refs[2].masks) == {"lobes", "airway", "vessels"} and refs[2].truth is None


def test_cache_gives_decoded_volumes_and_splits(tmp_path):
    cache = make_cache(tmp_path / "cache", n=4, size=16)
    refs = find_volumes(cache)
    assert len(refs) == 4 and all(r.cached is not None for r in refs)
    volume = load_volume(refs[0])
    assert volume.hu.shape == (16, 16, 16) and volume.hu.min() < -900 and volume.hu.max() > 0
    assert set(volume.masks) == {"lobes", "airway", "vessels"}
    train = find_volumes(cache, split="train")
    val = find_volumes(cache, split="val")
    assert len(train) + len(val) == 4 and train and val
    with pytest.raises(DataError, match="no subjects in split 'test'"):
        find_volumes(cache, split="test")
    ref = find_volumes(cache, grid="lr")[0]  # the base model's grid
    base = load_volume(ref)
    assert ref.cached.name == "lr.npy" and base.hu.shape == (4, 4, 4)
    np.testing.assert_allclose(
        base.hu, decode_volume(np.asarray(np.load(ref.cached), np.float32))["ct"], atol=0.5
    )
    with pytest.raises(DataError, match="cache grid 'mid'"):
        find_volumes(cache, grid="mid")


def test_folder_of_nifti_files(tmp_path):
    for name in ("b.nii.gz", "a.nii"):
        save_nifti(tmp_path / name, np.full((8, 8, 8), -500, np.int16), spacing_affine(2.0, (8, 8, 8)))
    refs = find_volumes(tmp_path)
    assert [r.id for r in refs] == ["a", "b"] and not refs[0].masks
    assert load_volume(refs[1]).hu.mean() == -500


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        find_volumes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found no volumes"):
        find_volumes(tmp_path / "empty")
    with pytest.raises(DataError, match="applies to a prepared cache"):
        find_volumes(tmp_path / "empty", split="test")
    (tmp_path / "bad.csv").write_text("name,path\nx,y\n")
    with pytest.raises(DataError, match="bad.csv: expected an `id` column"):
        find_volumes(tmp_path / "bad.csv")
    root = make_sample_folder(tmp_path / "s", n=1, size=16)
    save_nifti(root / "0" / "lobes.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="lobes.nii.gz: lobes mask of shape"):
        load_volume(find_volumes(root)[0])
