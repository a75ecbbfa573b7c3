"""Generated samples in an output directory OUT: OUT/<index>/ per sample, each written whole as it finishes.

The one mechanism behind the CT samples (`medsyn.generation.output`) and the radiographs
(`medsyn.radiograph.output`). Each sample is written into a hidden temporary folder inside OUT and renamed
to OUT/<index>/ when complete, so a folder named <index> is always complete and an interrupted run keeps
what it finished. Its meta.json records the request that made it: a rerun of the same request keeps those
samples and makes the rest. medsyn changes nothing in OUT but its own sample folders, and replaces one made
by another request only when asked (`overwrite`). What differs between kinds of sample, how a meta.json is
recognised and which of its fields make the request, is a `SampleKind`; how a sample's files are written is
the `write` callable of `write_samples`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medsyn.errors import DataError
from medsyn.io import locked_dir, make_temp_dir, publish_dir

META_FILE = "meta.json"
UNFINISHED = ".medsyn-unfinished"  # marker file in a sample's temporary folder while it is written
INDEX = re.compile(r"0|[1-9][0-9]*")  # a sample folder's name
IGNORED_OPTIONS = ("batch_size",)  # options a sample does not depend on
_TEMP = re.compile(r"\.sample-(0|[1-9][0-9]*)\.[a-z0-9_]+\.tmp(\.old)?")  # make_temp_dir names (+ aside)

# make(metas of a batch, step callback) -> one sample per meta (a list, or a tensor (B, ...))
MakeBatch = Callable[[list[dict], Callable[..., None]], Sequence[Any]]
# write(directory, sample, meta): one sample's files, meta.json included, into `directory`
WriteSample = Callable[[Path, Any, dict], None]


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Versions of Python and the packages `names` a sample depends on (provenance in meta.json)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _any_meta(meta: dict[str, Any]) -> bool:
    return True


def _no_leftovers(out_dir: Path) -> list[Path]:
    return []


@dataclass
class OutputPlan:
    """What a run does in OUT: sample indices kept from an earlier run of the same request, indices whose
    medsyn sample folder from another request it replaces, and such folders beyond the request."""

    keep: set[int] = field(default_factory=set)
    replace: set[int] = field(default_factory=set)
    extra: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class SampleKind:
    """One kind of medsyn sample folder.

    request_of: meta.json -> the fields a rerun must match for the sample to be kept (a missing field
        raises KeyError, TypeError, ...: not a sample of this kind).
    accepts: meta.json -> whether it is this kind's at all (beyond holding the request's fields).
    example: an output directory to suggest when one is refused.
    leftovers: OUT -> temporary folders older versions left (beside OUT), removed with the unfinished ones.
    """

    request_of: Callable[[dict[str, Any]], dict[str, Any]]
    accepts: Callable[[dict[str, Any]], bool] = _any_meta
    example: str = "out/samples"
    leftovers: Callable[[Path], list[Path]] = _no_leftovers

    def request(self, meta: dict[str, Any]) -> dict[str, Any]:
        """`request_of(meta)` as it reads back from meta.json."""
        return json.loads(json.dumps(self.request_of(meta), default=str))

    def read(self, path: Path) -> dict[str, Any] | None:
        """The request of the sample folder `path` (see `request`), or None when it is not one of this kind."""
        if not path.is_dir() or path.is_symlink():
            return None
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            return self.request(meta) if self.accepts(meta) else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def unfinished(self, path: Path) -> bool:
        """A temporary sample folder medsyn left behind: its name, and its marker, a whole sample or nothing."""
        if not _TEMP.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
            return False
        return (path / UNFINISHED).is_file() or not any(path.iterdir()) or self.read(path) is not None

    def clean_unfinished(self, out_dir: Path) -> int:
        """Remove the temporary sample folders an interrupted run left in `out_dir` (and the `leftovers`
        of older versions); returns how many. Nothing else is touched."""
        stale = [p for p in out_dir.iterdir() if self.unfinished(p)] + self.leftovers(out_dir)
        for path in stale:
            shutil.rmtree(path)
        return len(stale)

    def check_out_dir(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        """Refuse an output directory medsyn must not write samples into, before any work.

        Refused always: a symbolic link, a file, the current directory or one above it, the home
        directory, a filesystem root. Refused unless `overwrite`: a directory holding files medsyn did not
        write (with `overwrite` the samples are written beside them, and they are kept).
        """
        out_dir = Path(out_dir)
        if out_dir.is_symlink():
            raise DataError(f"{out_dir}: is a symbolic link; expected a real directory path for the samples")
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"{out_dir}: is a file; expected a directory for the samples")
        real, cwd = out_dir.resolve(), Path.cwd().resolve()
        try:
            home = Path.home().resolve()
        except (RuntimeError, KeyError):
            home = None
        what = None
        if real.parent == real:
            what = "a filesystem root"
        elif real == home:
            what = "the home directory"
        elif real == cwd or real in cwd.parents:
            what = "the current directory or one above it"
        if what is not None:
            raise DataError(
                f"{out_dir}: is {what}; expected a directory of its own for the samples, e.g. {self.example}"
            )
        if not out_dir.is_dir() or overwrite:
            return
        foreign = [
            p.name for p in sorted(out_dir.iterdir()) if not self.unfinished(p) and self.read(p) is None
        ]
        if foreign:
            names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise DataError(
                f"{out_dir}: holds files medsyn did not write ({names}); choose a new or empty directory, or "
                "pass --overwrite to write the samples beside them (they are kept)"
            )

    def plan(self, out_dir: Path, metas: Sequence[dict], overwrite: bool) -> OutputPlan:
        """Compare the sample folders in `out_dir` with the request (`metas`, one per index).

        Without `overwrite` a medsyn sample of another request is refused; a folder medsyn did not write
        where a sample must go is refused always.
        """
        wanted = {m["index"]: self.request(m) for m in metas}
        plan, conflicts = OutputPlan(), []
        for path in sorted(out_dir.iterdir()):
            if not INDEX.fullmatch(path.name):
                continue  # not a sample's name: never touched
            found, index = self.read(path), int(path.name)
            if found is None:
                if index in wanted:
                    raise DataError(
                        f"{path}: is in the way of sample {index} and medsyn did not write it (no medsyn "
                        "meta.json); move it away or choose another output directory"
                    )
                continue
            if index not in wanted:
                plan.extra.append(path)
                conflicts.append(f"{path}: a sample beyond the {len(metas)} requested, from another request")
                continue
            differ = [k for k in wanted[index] if wanted[index][k] != found.get(k)]
            if not differ:
                plan.keep.add(index)
            else:
                plan.replace.add(index)
                conflicts.append(f"{path}: a sample of another request ({', '.join(differ)} differ)")
        if conflicts and not overwrite:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise DataError(
                f"{conflicts[0]}{more}; pass --overwrite to replace medsyn's sample folders that differ, or "
                "choose another output directory"
            )
        return plan


def write_samples(
    kind: SampleKind, out_dir: str | os.PathLike, metas: Sequence[dict], make: MakeBatch, write: WriteSample,
    batch_size: int = 1, overwrite: bool = False, steps: int = 0, step_unit: tuple[str, str] = ("steps", "step"),
    detail: str = "", log: Callable[[str], None] | None = None, progress: bool | None = None,
) -> Path:  # fmt: skip
    """Make the samples `metas` (each with its index and seed) in batches with `make` and write
    OUT/<index>/ with `write` as each batch finishes, its meta with the seconds per sample added.

    Samples already in `out_dir` from the same request are kept; medsyn sample folders of another request
    are refused unless `overwrite` (then replaced); nothing else in `out_dir` is touched (see
    `SampleKind.check_out_dir`). progress: tqdm bars on stderr over samples and the `steps` of a batch,
    counted in `step_unit` (name, unit) (None: on a terminal). detail: what each sample's log line adds.
    """
    if batch_size < 1:
        raise ValueError(f"write_samples: batch_size {batch_size}; expected a positive integer")
    out_dir = Path(out_dir)
    log = log or tqdm.write
    if not metas:
        raise DataError("no samples requested; give at least one prompt")
    kind.check_out_dir(out_dir, overwrite)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = contextlib.ExitStack()
    try:
        try:
            lock.enter_context(locked_dir(out_dir))
        except BlockingIOError as err:
            raise DataError(
                f"{out_dir}: another run is writing samples here; wait for it to end or choose another "
                "output directory"
            ) from err
        with lock:
            removed = kind.clean_unfinished(out_dir)
            if removed:
                log(f"{out_dir}: removed {removed} unfinished sample folder(s) an interrupted run left")
            plan = kind.plan(out_dir, metas, overwrite)
            if plan.keep:
                log(f"{out_dir}: {len(plan.keep)} of {len(metas)} sample(s) already made by an earlier run of "
                    "the same request are kept; making the rest")  # fmt: skip
            todo = [m for m in metas if m["index"] not in plan.keep]
            batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
            _make_all(
                out_dir, len(metas), batches, make, write, plan, steps, step_unit, detail, log, progress
            )
            for path in plan.extra:
                shutil.rmtree(path)
                log(f"{path}: removed (a sample of an earlier request beyond this one, --overwrite)")
    finally:
        for path in created:  # a run that wrote nothing leaves no empty directories behind
            try:
                path.rmdir()
            except OSError:
                break
    return out_dir


def _make_all(
    out_dir: Path, total: int, batches: list[list[dict]], make: MakeBatch, write: WriteSample, plan: OutputPlan,
    steps: int, step_unit: tuple[str, str], detail: str, log: Callable[[str], None], progress: bool | None,
) -> None:  # fmt: skip
    """Make each batch and write its samples as it finishes, with progress bars and a line per sample."""
    disable = None if progress is None else not progress
    done = len(plan.keep)
    samples_bar = tqdm(total=total, initial=done, desc="samples", unit="sample", disable=disable)
    steps_bar = tqdm(
        total=steps, desc=step_unit[0], unit=step_unit[1], leave=False, disable=disable if steps else True
    )
    try:
        for batch in batches:
            steps_bar.reset(total=steps)
            began = time.perf_counter()
            samples = make(batch, lambda *_: steps_bar.update())
            seconds = (time.perf_counter() - began) / len(batch)
            for meta, sample in zip(batch, samples, strict=True):
                index = meta["index"]
                _write_one(
                    out_dir, write, sample, {**meta, "seconds": round(seconds, 3)}, index in plan.replace
                )
                done += 1
                samples_bar.update()
                log(f"sample {index}: seed {meta['seed']}, {seconds:.1f} s{detail} -> {out_dir / str(index)}")
    except KeyboardInterrupt:
        log(f"interrupted: {done} of {total} sample(s) are complete in {out_dir}; run the same command again "
            "to make the rest")  # fmt: skip
        raise
    finally:
        steps_bar.close()
        samples_bar.close()


def _write_one(out_dir: Path, write: WriteSample, sample: Any, meta: dict, replace: bool) -> None:
    """Write sample `meta["index"]` into a temporary folder in `out_dir`, then rename it into place."""
    index = meta["index"]
    tmp = make_temp_dir(out_dir, f".sample-{index}.", marker=UNFINISHED)
    try:
        write(tmp, sample, meta)
        (tmp / UNFINISHED).unlink()
        aside = tmp.with_name(tmp.name + ".old") if replace else None
        publish_dir(tmp, out_dir / str(index), aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
