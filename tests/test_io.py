"""Atomic file and directory output: renamed into place on success, nothing half-written on error."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsyn.io import atomic_dir, atomic_path, write_json, write_text


@pytest.fixture
def umask_027() -> Iterator[None]:
    """Run a test under umask 027 (group may read, others nothing), restoring the old umask after."""
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_path_renames_onto_the_target(tmp_path):
    target = tmp_path / "new" / "volume.nii.gz"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
        assert not target.exists()  # nothing at the target until the block succeeds
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data" and not tmp.exists()
    assert os.listdir(target.parent) == ["volume.nii.gz"]


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.txt"]  # no temporary file left behind


def test_atomic_path_permissions_honour_umask(tmp_path, umask_027):
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600


def test_atomic_dir_permissions_honour_umask(tmp_path, umask_027):
    with atomic_dir(tmp_path / "subject") as tmp:
        (tmp / "hr.npy").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "subject").stat().st_mode) == 0o750  # 0777 & ~027, not mkdtemp's 0700


def test_atomic_dir_replaces_only_with_overwrite(tmp_path):
    target = tmp_path / "subject"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["subject"]
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["subject"]


def test_atomic_dir_cleans_up_on_error(tmp_path):
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "subject") as tmp:
            (tmp / "hr.npy").write_bytes(b"partial")
            raise KeyError("findings")
    assert os.listdir(tmp_path) == []


def test_write_json_round_trips(tmp_path):
    obj = {
        "id": "ct_001",
        "spacing": [1.5, 1.5, 2.0],
        "report": "Épanchement pleural.",
        "nested": {"k": None},
    }
    write_json(tmp_path / "meta.json", {**obj, "source": Path("/data/ct_001.nii.gz")})
    text = (tmp_path / "meta.json").read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == {**obj, "source": "/data/ct_001.nii.gz"}  # paths written as strings
    write_text(tmp_path / "meta.json", "replaced")
    assert (tmp_path / "meta.json").read_text() == "replaced"
