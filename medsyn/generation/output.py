"""Writing generated samples: OUT/<index>/ per sample, each written whole as it finishes, with provenance.

Each sample is written into a hidden temporary folder inside OUT and renamed to OUT/<index>/ when
complete, so a folder named <index> is always complete and an interrupted run keeps what it finished.
Its meta.json records the request that made it (prompt, seed, options, weights' sha256): a rerun of the
same request keeps those samples and makes the rest. medsyn changes nothing in OUT but its own sample
folders, and replaces one made by another request only when asked (`overwrite`).
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

import torch
from tqdm import tqdm

from medsyn.data.channels import decode_volume, encode_lobes
from medsyn.data.grid import Grid
from medsyn.data.nifti import save_nifti
from medsyn.errors import DataError
from medsyn.generation.fixed import FixedChannels
from medsyn.generation.stages import SR_SEED_OFFSET, SampleOptions, synthesize
from medsyn.io import locked_dir, make_temp_dir, publish_dir, write_json
from medsyn.viz import render_volume, save_png

SAMPLE_FILES = ("ct.nii.gz", "lobes.nii.gz", "airway.nii.gz", "vessels.nii.gz", "preview.png", "meta.json")
UNFINISHED = ".medsyn-unfinished"  # marker file in a sample's temporary folder while it is written
_INDEX = re.compile(r"0|[1-9][0-9]*")
_TEMP = re.compile(r"\.sample-(0|[1-9][0-9]*)\.[a-z0-9_]+\.tmp(\.old)?")  # make_temp_dir names (+ aside)
_IGNORED_OPTIONS = ("batch_size",)  # options a sample does not depend on


def package_versions() -> dict[str, str]:
    """Versions of the packages a sample depends on (provenance in meta.json)."""
    out = {"python": platform.python_version()}
    for name in ("medsyn", "torch", "monai", "numpy", "nibabel", "transformers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_sample(directory: Path, x: torch.Tensor, grid: Grid, meta: dict) -> None:
    """Write one sample (4, *S) in the diffusion range as the design's files into `directory`.

    Generated lobes are decoded with the lungs in mind (`medsyn.data.channels.decode_lobes_clean`), fixed
    ones (`meta["fixed"]`) exactly as given; the preview shows the lobes as written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    arrays = decode_volume(x.numpy(), clean="lobes" not in meta["fixed"])
    for name, array in arrays.items():
        save_nifti(directory / f"{name}.nii.gz", array, grid.affine, dtype=array.dtype)
    title = f"seed {meta['seed']}: {meta['prompt']}"
    shown = x.clone()
    shown[1] = torch.from_numpy(encode_lobes(arrays["lobes"]))
    save_png(directory / "preview.png", render_volume(shown, spacing=grid.affine, title=title))
    write_json(directory / "meta.json", meta)


def request_of(meta: dict) -> dict[str, Any]:
    """What made a sample, from its meta.json: the fields a rerun must match for the sample to be kept."""
    options = {k: v for k, v in meta["options"].items() if k not in _IGNORED_OPTIONS}
    request = {
        "index": meta["index"], "prompt": meta["prompt"], "seed": meta["seed"], "options": options,
        "fixed": {name: src["sha256"] for name, src in meta["fixed"].items()},
        "weights": {stage: w["sha256"] for stage, w in meta["weights"].items()},
        "keypatches": {stage: w["keypatches"]["codebook_sha256"] for stage, w in meta["weights"].items()
                       if "keypatches" in w},
        "grid": {k: v for k, v in meta["grid"].items() if k != "source"},  # not where it was read from
    }  # fmt: skip
    return json.loads(json.dumps(request, default=str))  # as it reads back from meta.json


def read_sample(path: Path) -> dict[str, Any] | None:
    """The request of the medsyn sample folder `path` (see `request_of`), or None when it is not one."""
    if not path.is_dir() or path.is_symlink():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return request_of(meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _unfinished(path: Path) -> bool:
    """A temporary sample folder medsyn left behind: its name, and its marker, a whole sample or nothing."""
    if not _TEMP.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
        return False
    return (path / UNFINISHED).is_file() or not any(path.iterdir()) or read_sample(path) is not None


def _old_unfinished(path: Path, out_dir: Path) -> bool:
    """A temporary OUT that earlier versions wrote beside OUT (`.OUT.xxxxxxxx.tmp`) and a killed run
    left: nothing in it but sample folders holding sample files (or their temporary names)."""
    if not re.fullmatch(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}\.tmp", path.name):
        return False
    if not path.is_dir() or path.is_symlink():
        return False
    for sample in path.iterdir():
        if not _INDEX.fullmatch(sample.name) or not sample.is_dir() or sample.is_symlink():
            return False
        if any(f.name not in SAMPLE_FILES and not f.name.startswith(".") for f in sample.iterdir()):
            return False
    return True


def clean_unfinished(out_dir: Path) -> int:
    """Remove the temporary sample folders an interrupted run left in `out_dir` (and, from older
    versions, beside it); returns how many. Nothing else is touched."""
    stale = [p for p in out_dir.iterdir() if _unfinished(p)]
    if out_dir.name and out_dir.parent.is_dir():
        stale += [p for p in out_dir.parent.iterdir() if _old_unfinished(p, out_dir)]
    for path in stale:
        shutil.rmtree(path)
    return len(stale)


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output directory medsyn must not write samples into, before any work.

    Refused always: a symbolic link, a file, the current directory or one above it, the home directory,
    a filesystem root. Refused unless `overwrite`: a directory holding files medsyn did not write
    (with `overwrite` the samples are written beside them, and they are kept).
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
            f"{out_dir}: is {what}; expected a directory of its own for the samples, e.g. out/samples"
        )
    if not out_dir.is_dir() or overwrite:
        return
    foreign = [p.name for p in sorted(out_dir.iterdir()) if not _unfinished(p) and read_sample(p) is None]
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(
            f"{out_dir}: holds files medsyn did not write ({names}); choose a new or empty directory, or pass "
            "--overwrite to write the samples beside them (they are kept)"
        )


@dataclass
class OutputPlan:
    """What a run does in OUT: sample indices kept from an earlier run of the same request, indices whose
    medsyn sample folder from another request it replaces, and such folders beyond the request."""

    keep: set[int] = field(default_factory=set)
    replace: set[int] = field(default_factory=set)
    extra: list[Path] = field(default_factory=list)


def plan_output(out_dir: Path, metas: Sequence[dict], overwrite: bool) -> OutputPlan:
    """Compare the sample folders in `out_dir` with the request (`metas`, one per index).

    Without `overwrite` a medsyn sample of another request is refused; a folder medsyn did not write
    where a sample must go is refused always.
    """
    wanted = {m["index"]: request_of(m) for m in metas}
    plan, conflicts = OutputPlan(), []
    for path in sorted(out_dir.iterdir()):
        if not _INDEX.fullmatch(path.name):
            continue  # not a sample's name: never touched
        found, index = read_sample(path), int(path.name)
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


def _write_one(out_dir: Path, index: int, x: torch.Tensor, grid: Grid, meta: dict, replace: bool) -> None:
    """Write sample `index` into a temporary folder in `out_dir`, then rename it to `out_dir/<index>`."""
    tmp = make_temp_dir(out_dir, f".sample-{index}.", marker=UNFINISHED)
    try:
        write_sample(tmp, x, grid, meta)
        (tmp / UNFINISHED).unlink()
        aside = tmp.with_name(tmp.name + ".old") if replace else None
        publish_dir(tmp, out_dir / str(index), aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_requests(requests: Sequence[tuple[str, int]]) -> None:
    """Refuse an empty request list or an empty prompt."""
    if not requests:
        raise DataError("no samples requested; give at least one prompt")
    for index, (prompt, _) in enumerate(requests):
        if not str(prompt).strip():
            raise DataError(
                f"prompt of sample {index} is empty; expected a report text (for unconditional samples "
                "give any prompt with guidance 0)"
            )


def run_sampling(
    base, sr, requests: Sequence[tuple[str, int]], options: SampleOptions, out_dir: str | Path,
    fixed: FixedChannels | None = None, overwrite: bool = False, log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> Path:  # fmt: skip
    """Sample every (prompt, seed) request in batches and write `out_dir/<index>/`, each as it finishes.

    Samples already in `out_dir` from the same request are kept; medsyn sample folders of another
    request are refused unless `overwrite` (then replaced); nothing else in `out_dir` is touched (see
    `check_out_dir`). progress: tqdm bars on stderr over samples and sampler steps (None: on a terminal).
    """
    out_dir = Path(out_dir)
    log = log or tqdm.write
    check_requests(requests)
    check_out_dir(out_dir, overwrite)
    if sr is not None and tuple(sr.grid.shape) != tuple(s * base.factor for s in base.grid.shape):
        raise DataError(
            f"{sr.run_dir}: SR grid {list(sr.grid.shape)} is not {base.factor}x the base grid "
            f"{list(base.grid.shape)} of {base.run_dir}; expected runs trained on the same cache"
        )
    if sr is not None and options.lowres_noise is not None:
        sr.model.conditioners["lowres"].check_level(options.lowres_noise, "--sr-noise")
    grid = sr.grid if sr is not None else base.grid
    common = {
        "sampler": options.sampler, "steps": options.steps, "guidance": options.guidance,
        "options": options.to_dict(), "fixed": fixed.meta() if fixed is not None else {},
        "weights": {"base": base.provenance(), **({"sr": sr.provenance()} if sr is not None else {})},
        "versions": package_versions(),
        "grid": {**grid.to_dict(), "stage": "sr" if sr is not None else "base"},
        "base_grid": base.grid.to_dict(),
        "device": str(base.model.device),
    }  # fmt: skip
    metas = [{"index": i, "prompt": p, "seed": s, **common} for i, (p, s) in enumerate(requests)]
    if sr is not None:
        for meta in metas:
            meta["sr_seed"] = meta["seed"] + SR_SEED_OFFSET
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
            removed = clean_unfinished(out_dir)
            if removed:
                log(f"{out_dir}: removed {removed} unfinished sample folder(s) an interrupted run left")
            plan = plan_output(out_dir, metas, overwrite)
            if plan.keep:
                log(f"{out_dir}: {len(plan.keep)} of {len(metas)} sample(s) already made by an earlier run of "
                    "the same request are kept; making the rest")  # fmt: skip
            _sample_all(base, sr, metas, options, out_dir, fixed, grid, plan, log, progress)
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


def _sample_all(
    base, sr, metas: list[dict], options: SampleOptions, out_dir: Path, fixed: FixedChannels | None,
    grid: Grid, plan: OutputPlan, log: Callable[[str], None], progress: bool | None,
) -> None:  # fmt: skip
    """Sample the metas not kept by `plan` in batches, writing each sample as its batch finishes."""
    todo = [m for m in metas if m["index"] not in plan.keep]
    steps = options.steps + (options.sr_steps if sr is not None else 0)
    disable = None if progress is None else not progress
    done = len(plan.keep)
    samples_bar = tqdm(total=len(metas), initial=done, desc="samples", unit="sample", disable=disable)
    steps_bar = tqdm(total=steps, desc="steps", unit="step", leave=False, disable=disable)
    try:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            steps_bar.reset(total=steps)
            began = time.perf_counter()
            x = synthesize(base, sr, [m["prompt"] for m in batch], [m["seed"] for m in batch], options, fixed,
                           callback=lambda *_: steps_bar.update())  # fmt: skip
            seconds = (time.perf_counter() - began) / len(batch)
            for j, meta in enumerate(batch):
                index = meta["index"]
                _write_one(out_dir, index, x[j], grid, {**meta, "seconds": round(seconds, 3)},
                           replace=index in plan.replace)  # fmt: skip
                done += 1
                samples_bar.update()
                log(f"sample {index}: seed {meta['seed']}, {seconds:.1f} s, {list(grid.shape)} at "
                    f"{grid.spacing[0]:g} mm -> {out_dir / str(index)}")  # fmt: skip
    except KeyboardInterrupt:
        log(f"interrupted: {done} of {len(metas)} sample(s) are complete in {out_dir}; run the same command "
            "again to make the rest")  # fmt: skip
        raise
    finally:
        steps_bar.close()
        samples_bar.close()
