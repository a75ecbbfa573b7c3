"""The checkpoints of a run directory: written whole, checked by a checksum, one latest, newest resumes.

`run_dir/checkpoints/` holds `step=NNNNNNN.ckpt` files, written every `checkpoint.every_n_steps` steps and
where a fit stops (the newest `checkpoint.keep` are kept), and `last.ckpt`, a hard link to the newest
one (a copy where the filesystem has no hard links). Beside each, `NAME.ckpt.json` records the file's
sha256, size and global step. A file is written under a temporary name beside its target, synced and
renamed, and a step file is complete before `last.ckpt` points at it: a killed run leaves complete
checkpoints and hidden temporary files, which the next run removes.

Resuming takes the newest checkpoint by global step (not by name) whose checksum matches, or, for a
checkpoint written before the checksums, that loads; broken ones are passed over with one line each.
Checkpoints load with `weights_only=True`: they are data, never code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from medsyn.errors import DataError
from medsyn.io import atomic_path, write_json
from medsyn.weights import sha256_file

LAST = "last.ckpt"
_STEP = re.compile(r"^step=(\d+)\.ckpt$")


def step_name(step: int) -> str:
    """The file name of the checkpoint of global step `step`."""
    return f"step={step:07d}.ckpt"


def sidecar(path: str | os.PathLike) -> Path:
    """The checksum record beside a checkpoint: `NAME.ckpt.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class _Hashing:
    """A write-only file that hashes and counts what torch.save streams into it."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Save `checkpoint` at `path` with its checksum record; returns the record.

    The file is written beside `path` under a temporary name, synced, and renamed last, after its record.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            out = _Hashing(f)
            torch.save(checkpoint, out)
            f.flush()
            os.fsync(f.fileno())
        record = {"file": path.name, "sha256": out.sha.hexdigest(), "bytes": out.size,
                  "global_step": int(checkpoint.get("global_step", -1)),
                  "epoch": int(checkpoint.get("epoch", -1))}  # fmt: skip
        write_json(sidecar(path), record)
    return record


def point_latest(target: str | os.PathLike) -> Path:
    """Make `last.ckpt` beside `target` the checkpoint `target` (record first, then the file); returns it."""
    target = Path(target)
    last = target.with_name(LAST)
    for src, dst in ((sidecar(target), sidecar(last)), (target, last)):
        with atomic_path(dst) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:  # no hard links here (some network or FAT filesystems): copy
                shutil.copyfile(src, tmp)
    return last


def _record(path: Path) -> dict[str, Any] | None:
    """The checksum record of `path`, or None for a checkpoint written without one."""
    record_path = sidecar(path)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        int(record["global_step"]), str(record["sha256"]), int(record["bytes"])
        return record
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{record_path}: unreadable checksum record ({type(err).__name__})") from err


def _load(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """torch.load as data only; any failure is a DataError naming the file."""
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size if path.exists() else 0
        raise DataError(
            f"{path}: not a checkpoint ({'empty' if size == 0 else 'truncated, or another format'})"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise DataError(
            f"{path}: holds objects other than tensors and plain data, which are not loaded since loading "
            f"them could run code (UnpicklingError)"
        ) from err
    except Exception as err:  # a damaged zip, a torch version mismatch, ...
        reason = " ".join(str(err).split())[:200]
        raise DataError(f"{path}: not a checkpoint that loads ({type(err).__name__}: {reason})") from err
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise DataError(f"{path}: not a Lightning checkpoint (no global_step)")
    return checkpoint


def claimed_step(path: str | os.PathLike) -> int:
    """The global step a checkpoint holds, by its record (or, without one, by loading it lazily)."""
    path = Path(path)
    record = _record(path)
    if record is not None:
        return int(record["global_step"])
    return int(_load(path, mmap=True)["global_step"])


_verified: dict[tuple, int] = {}


def verify(path: str | os.PathLike) -> int:
    """Check a checkpoint against its record (size and sha256; without a record: that it loads); returns
    its global step. Raises DataError naming the file and what is wrong."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"{path}: no such checkpoint file") from err
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return _verified[key]
    record = _record(path)
    if record is None:
        step = claimed_step(path)
    else:
        if stat.st_size != int(record["bytes"]):
            raise DataError(f"{path}: truncated or damaged ({stat.st_size} bytes; {sidecar(path).name} "
                            f"records {record['bytes']})")  # fmt: skip
        if sha256_file(path) != record["sha256"]:
            raise DataError(f"{path}: damaged (its sha256 differs from the one in {sidecar(path).name})")
        step = int(record["global_step"])
    _verified[key] = step
    return step


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A verified checkpoint, loaded as data (`weights_only=True`)."""
    verify(path)
    return _load(Path(path), map_location)


def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The `*.ckpt` files of a checkpoint directory (temporary files excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))


def newest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest usable checkpoint by global step, and a line for each newer or unreadable one passed
    over."""
    claims, problems = [], []
    for path in checkpoint_files(ckpt_dir):
        try:
            claims.append((claimed_step(path), path.name == LAST, path))
        except DataError as err:
            problems.append(str(err))
    for _step, _is_last, path in sorted(claims, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            verify(path)
            return path, problems
        except DataError as err:
            problems.append(str(err))
    return None, problems


def prune(ckpt_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Remove step checkpoints beyond the newest `keep` (by global step), never the one `last.ckpt` is;
    also Lightning's `last-vN.ckpt` copies, which once stood beside `last.ckpt`. Returns what went."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST
    steps = []
    for path in checkpoint_files(ckpt_dir):
        match = _STEP.match(path.name)
        if match:
            with contextlib.suppress(DataError):
                steps.append((claimed_step(path), path))
    doomed = [p for _, p in sorted(steps, reverse=True)[max(keep, 1) :]]
    doomed = [p for p in doomed if not (last.exists() and os.path.samefile(p, last))]
    doomed += [p for p in checkpoint_files(ckpt_dir) if re.match(r"^last-v\d+\.ckpt$", p.name)]
    for path in doomed:
        remove_checkpoint(path)
    return doomed


def make_latest(path: str | os.PathLike, keep: int) -> list[Path]:
    """Make `last.ckpt` the checkpoint `path` that a run resumes from (writing its checksum record when
    an earlier medsyn wrote none), remove the checkpoints later than it or unreadable (the resumed run
    replaces them) and step checkpoints beyond `keep`. Returns the later or unreadable ones removed."""
    path = Path(path)
    last = path.with_name(LAST)
    if path.name != LAST:
        if not sidecar(path).is_file():
            _write_record(path, claimed_step(path))
        point_latest(path)
    step, later = claimed_step(path), []
    for other in checkpoint_files(path.parent):
        if other.name == LAST or os.path.samefile(other, last):
            continue
        try:
            newer = claimed_step(other) > step
        except DataError:
            newer = True
        if newer:
            remove_checkpoint(other)
            later.append(other)
    prune(path.parent, keep)
    return later


def _write_record(path: Path, step: int) -> None:
    record = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "global_step": step,
              "epoch": -1}  # fmt: skip
    write_json(sidecar(path), record)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Remove a checkpoint and its record."""
    path = Path(path)
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def remove_leftovers(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary files of a killed run and records whose checkpoint is gone; returns them."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    gone = [p for p in ckpt_dir.glob(".*.tmp*") if p.is_file()]
    gone += [p for p in ckpt_dir.glob("*.ckpt.json") if not p.with_name(p.name[: -len(".json")]).exists()]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for a run directory: saving `last.ckpt` writes the step's checkpoint
    (`step=N.ckpt`), points `last.ckpt` at it and removes step checkpoints beyond `keep`; other paths are
    written as given. Loading verifies the checksum and reads data only."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = int(keep)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        path = Path(path)
        if path.name != LAST:
            write_checkpoint(checkpoint, path)
            return
        target = path.with_name(step_name(int(checkpoint["global_step"])))
        write_checkpoint(checkpoint, target)
        point_latest(target)
        prune(path.parent, self.keep)

    def load_checkpoint(
        self, path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path) -> None:
        remove_checkpoint(path)


class RunCheckpoints(Checkpoint):
    """Save the run's checkpoint (`last.ckpt`, through `RunCheckpointIO`) every `every_n_steps` optimizer
    steps and at the step where the fit stops.

    A `Checkpoint` callback: Lightning runs it after the other callbacks at a batch's end, so a checkpoint
    holds that step's EMA update. Saving at the last batch (not at the fit's end) records the loops in a
    state Lightning continues exactly, also when the stop falls on an epoch's last batch.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, every_n_steps: int) -> None:
        self.path = Path(ckpt_dir) / LAST
        self.every_n_steps = int(every_n_steps)
        self.last_model_path = ""
        self._last_global_step_saved = -1  # ModelCheckpoint's name: SaveLastOnEnd reads it
        self._seen = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen:  # no optimizer step since (gradient accumulation)
            return
        self._seen = step
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if periodic or _fit_stops_after_this_batch(trainer):
            self.save(trainer)

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self.last_model_path = str(self.path)
        self._last_global_step_saved = trainer.global_step


def _fit_stops_after_this_batch(trainer) -> bool:
    """Whether the fit ends after the current batch: max_steps reached, a stop requested, or the last
    batch of the last epoch."""
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return True
    if trainer.should_stop:
        return True
    max_epochs = trainer.max_epochs
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    return bool(last_batch and max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs)
