"""Sample output folders (medsyn.generation.output): which OUT is refused, what counts as medsyn's own,
how a sample's lobes are decoded."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsyn.data.channels import decode_volume, encode_volume
from medsyn.data.grid import Grid
from medsyn.data.nifti import spacing_affine
from medsyn.data.phantom import generate_phantom
from medsyn.errors import DataError
from medsyn.generation.output import check_out_dir, clean_unfinished, write_sample


@pytest.mark.parametrize("where", ["root", "cwd", "parent", "home", "symlink", "file"])
def test_unsafe_out_dirs_are_refused_even_with_overwrite(where, tmp_path, monkeypatch):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (tmp_path / "target").mkdir()
    (work / "link").symlink_to(tmp_path / "target")
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = {"root": Path("/"), "cwd": Path("."), "parent": Path(".."), "home": tmp_path / "home",
           "symlink": Path("link"), "file": Path("notes.txt")}[where]  # fmt: skip
    with pytest.raises(DataError, match="expected a") as info:
        check_out_dir(out, overwrite=True)
    assert str(out) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_new_empty_or_nested_out_dirs_are_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for out in (Path("empty"), Path("new/samples"), tmp_path / "other"):
        check_out_dir(out)


def test_only_medsyn_temporaries_are_cleaned(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    unfinished = out / ".sample-3.ab_cd123.tmp"  # medsyn's name, with its marker
    unfinished.mkdir()
    (unfinished / ".medsyn-unfinished").touch()
    (unfinished / "ct.nii.gz").write_bytes(b"partial")
    (out / ".sample-4.x1y2z3.tmp").mkdir()  # killed right after it was made: empty
    lookalike = out / ".sample-5.mine.tmp"  # the user's folder with medsyn's name but not its content
    lookalike.mkdir()
    (lookalike / "data.txt").write_text("mine")
    (out / ".cache.tmp").mkdir()
    old = tmp_path / ".out.a1b2c3d4.tmp" / "0"  # before 0.2: a temporary OUT beside OUT
    old.mkdir(parents=True)
    (old / "ct.nii.gz").write_bytes(b"partial")
    (tmp_path / ".other.a1b2c3d4.tmp").mkdir()  # another directory's: not ours to touch
    assert clean_unfinished(out) == 3
    assert sorted(p.name for p in out.iterdir()) == [".cache.tmp", ".sample-5.mine.tmp"]
    assert (lookalike / "data.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.a1b2c3d4.tmp", "out"]


@pytest.mark.parametrize("fixed", [{}, {"lobes": {"path": "given.nii.gz"}}])
def test_generated_lobes_are_written_with_the_lungs_in_mind_fixed_ones_as_given(tmp_path, fixed):
    phantom = generate_phantom(size=32, seed=2)
    x = encode_volume({"ct": phantom.ct, "lobes": phantom.lobes, "airway": phantom.airway,
                       "vessels": phantom.vessels})  # fmt: skip
    x[1] += np.random.default_rng(0).normal(0, 0.12, x[1].shape).astype(np.float32)  # a generated channel
    grid = Grid((32,) * 3, (8.0,) * 3, spacing_affine(8.0, (32,) * 3))
    write_sample(tmp_path, torch.from_numpy(x), grid, {"seed": 0, "prompt": "Normal.", "fixed": fixed})
    written = np.asarray(nib.load(tmp_path / "lobes.nii.gz").dataobj)
    expected = decode_volume(x, clean=not fixed)["lobes"]
    np.testing.assert_array_equal(written, expected)
    assert not np.array_equal(written, decode_volume(x, clean=bool(fixed))["lobes"])
    assert (tmp_path / "preview.png").is_file()
