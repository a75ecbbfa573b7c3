"""Checkpoints of a run directory: written whole beside their target, one latest, checksums, fallback."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medsyn.errors import DataError
from medsyn.training.checkpoints import (
    LAST,
    RunCheckpointIO,
    make_latest,
    newest_checkpoint,
    prune,
    remove_leftovers,
    sidecar,
    verify,
    write_checkpoint,
)
from medsyn.training.run import resolve_resume


def ckpt(step: int) -> dict:
    """A small stand-in for a Lightning checkpoint of global step `step`."""
    return {"global_step": step, "epoch": step // 3, "state_dict": {"w": torch.full((64,), float(step))}}


def save(ckpt_dir: Path, *steps: int, keep: int = 10) -> RunCheckpointIO:
    io = RunCheckpointIO(keep=keep)
    for step in steps:
        io.save_checkpoint(ckpt(step), ckpt_dir / LAST)
    return io


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_saving_last_writes_the_step_beside_it_with_a_checksum(tmp_path, monkeypatch, umask022):
    # Lightning's own writer stages checkpoints in $TMPDIR (left there, 2 MiB, by a kill); ours beside the target
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    save(ckpt_dir, 2)
    assert names(ckpt_dir) == ["last.ckpt", "last.ckpt.json", "step=0000002.ckpt", "step=0000002.ckpt.json"]
    assert os.path.samefile(ckpt_dir / LAST, ckpt_dir / "step=0000002.ckpt")  # a link: no second copy
    record = json.loads((ckpt_dir / "step=0000002.ckpt.json").read_text())
    data = (ckpt_dir / "step=0000002.ckpt").read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
    assert record["global_step"] == 2
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in ckpt_dir.iterdir())  # the umask, like any file
    assert list(tmpdir.iterdir()) == []
    loaded = RunCheckpointIO().load_checkpoint(ckpt_dir / LAST)
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.full((64,), 2.0))


def test_one_latest_and_keep_newest_steps(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    save(ckpt_dir, 2, 4, 6, 7, keep=2)
    assert names(ckpt_dir) == ["last.ckpt", "last.ckpt.json", "step=0000006.ckpt", "step=0000006.ckpt.json",
                               "step=0000007.ckpt", "step=0000007.ckpt.json"]  # fmt: skip
    assert verify(ckpt_dir / LAST) == 7
    # leftovers of an earlier medsyn: Lightning's versioned copies of last.ckpt go, as do steps beyond keep
    torch.save(ckpt(5), ckpt_dir / "last-v1.ckpt")
    write_checkpoint(ckpt(1), ckpt_dir / "step=0000001.ckpt")
    removed = prune(ckpt_dir, keep=2)
    assert sorted(p.name for p in removed) == ["last-v1.ckpt", "step=0000001.ckpt"]
    assert not sidecar(ckpt_dir / "step=0000001.ckpt").exists()


def test_newest_is_by_global_step_not_by_name(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    # what Lightning's save_last left after stops at 2 -> 10 -> 20: a stale last.ckpt, the newest in last-v2
    for name, step in (
        ("last.ckpt", 10),
        ("last-v1.ckpt", 2),
        ("last-v2.ckpt", 20),
        ("step=0000016.ckpt", 16),
    ):
        torch.save(ckpt(step), ckpt_dir / name)  # written before checksums: checked by loading
    found, problems = newest_checkpoint(ckpt_dir)
    assert found == ckpt_dir / "last-v2.ckpt" and problems == []
    assert make_latest(found, keep=3) == []  # resuming makes it the one latest; nothing later to replace
    assert names(ckpt_dir) == ["last.ckpt", "last.ckpt.json", "step=0000016.ckpt"]
    assert (
        verify(ckpt_dir / LAST) == 20
        and json.loads(sidecar(ckpt_dir / LAST).read_text())["global_step"] == 20
    )


def _damage(path: Path, how: str) -> None:
    """Replace `path` by a damaged copy (a file of its own: the step file it was linked to stays intact)."""
    data = path.read_bytes()
    path.unlink()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bit flip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif how == "planted pickle":
        path.write_bytes(pickle.dumps(os.system))  # weights_only loading must refuse code


@pytest.mark.parametrize(
    ("how", "with_record"),
    [(how, True) for how in ("truncated", "empty", "bit flip", "planted pickle")]
    # a checkpoint written before checksums: only an unreadable one can be told apart
    + [(how, False) for how in ("truncated", "empty", "planted pickle")],
)
def test_a_damaged_last_falls_back_to_the_newest_readable(tmp_path, capsys, how, with_record):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    save(ckpt_dir, 2, 4)
    os.unlink(ckpt_dir / "step=0000004.ckpt")  # last.ckpt is the only copy of step 4
    if not with_record:
        sidecar(ckpt_dir / LAST).unlink()
    _damage(ckpt_dir / LAST, how)
    cfg = OmegaConf.create({"run_dir": str(run_dir), "resume": "auto", "overwrite": False})
    assert resolve_resume(cfg) == str(ckpt_dir / "step=0000002.ckpt")
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "last.ckpt" in out and "step=0000002.ckpt (step 2)" in out, out


def test_no_readable_checkpoint_is_one_line_naming_the_files(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save({"global_step": 3, "hook": os.system}, ckpt_dir / LAST)  # code in a checkpoint
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "resume": "auto", "overwrite": False})
    with pytest.raises(DataError) as err:
        resolve_resume(cfg)
    message = str(err.value)
    assert "\n" not in message and "last.ckpt" in message and "UnpicklingError" in message
    assert "resume=never overwrite=true" in message
    cfg.resume = str(ckpt_dir / LAST)  # named explicitly: the same check
    with pytest.raises(DataError, match="last.ckpt: holds objects other than tensors and plain data"):
        resolve_resume(cfg)
    assert names(ckpt_dir) == ["last.ckpt"]  # nothing written


def test_remove_leftovers_of_a_killed_run(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    save(ckpt_dir, 2)
    partial = ckpt_dir / ".step=0000004.ckpt.k2j3.tmp.ckpt"
    partial.write_bytes(b"\0" * 1000)
    orphan = ckpt_dir / "step=0000004.ckpt.json"  # its checkpoint was never renamed into place
    orphan.write_text("{}")
    assert sorted(p.name for p in remove_leftovers(ckpt_dir)) == [partial.name, orphan.name]
    assert names(ckpt_dir) == ["last.ckpt", "last.ckpt.json", "step=0000002.ckpt", "step=0000002.ckpt.json"]
