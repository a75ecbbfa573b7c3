"""Safe file output: everything is written to a temporary name beside the target, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffixes); rename it onto `path` on success.

    Nothing half-written is left behind: on error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    usual_mode(tmp_path)  # mkstemp makes 0600
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; move it onto `path` when the block succeeds.

    An existing `path` is replaced only when `overwrite` is true (checked by the caller too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    usual_mode(tmp)  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite to replace it")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_temp_dir(parent: str | os.PathLike, prefix: str, marker: str | None = None) -> Path:
    """A new hidden-by-prefix temporary directory in `parent`, with the usual permissions; `marker`
    names an empty file created in it at once, so a later run can tell it was left unfinished."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    usual_mode(tmp)
    if marker is not None:
        (tmp / marker).touch()
    return tmp


def publish_dir(
    tmp: str | os.PathLike, path: str | os.PathLike, aside: str | os.PathLike | None = None
) -> None:
    """Rename the finished directory `tmp` onto `path`, so `path` always holds one complete version.

    An existing `path` is replaced only when `aside` is given: it is renamed to `aside` first and removed
    once the new one is in place (a crash in between leaves it at `aside`, never half-deleted at `path`).
    """
    tmp, path = Path(tmp), Path(path)
    if aside is not None and (path.exists() or path.is_symlink()):
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside)
        return
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists")
    os.rename(tmp, path)


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on the directory `path` for the block.

    Raises BlockingIOError at once when another process holds it; the lock ends with the process,
    so a killed run never leaves a stale lock (and no lock file) behind.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def usual_mode(path: str | os.PathLike) -> None:
    """Give `path` the permissions a new file (0666) or directory (0777) gets under the user's umask;
    for files made 0600/0700 by mkstemp, mkdtemp or libraries such as safetensors."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, UTF-8) atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
