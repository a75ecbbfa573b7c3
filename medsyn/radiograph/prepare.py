"""Build a radiograph cache (`medsyn.radiograph.cache`): DRRs of CT volumes (`medsyn drr`) or real
radiographs with their reports (`medsyn prepare --cxr`).

Both run the same way as `medsyn prepare`: every subject is made and written atomically in a worker, a
bad subject goes to failed.csv with its reason and the rest go on, finished subjects are skipped (so an
interrupted run resumes), and the manifest is rewritten from the subjects on disk at the end.

Labels (effusion side, cardiomegaly) of a DRR come from the phantom's truth.json when there is one
(beside the CT, or beside the CT a CT cache's meta.json names), else from the report
(`medsyn.radiograph.labels.report_labels`); those of a real radiograph from the input's label columns,
else from the report. `meta.json` says which in `labels_from`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medsyn.data.cache import read_meta
from medsyn.data.prepare import PrepareResult
from medsyn.data.readers import MAX_VOXELS
from medsyn.errors import ConfigError, DataError
from medsyn.radiograph.cache import (
    ENCODING,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    finished_subjects,
    write_failed,
    write_radiograph,
    write_radiograph_manifest,
)
from medsyn.radiograph.drr import MU_WATER, WINDOW_WET_MM, drr
from medsyn.radiograph.labels import report_labels
from medsyn.radiograph.readers import (
    CtSource,
    RadiographSubject,
    frontal_image,
    load_ct,
    load_report,
    read_ct_sources,
    read_cxr_input,
    read_radiograph,
    square_image,
    truth_labels,
)

__all__ = ["RadiographOptions", "make_drrs", "prepare_radiographs"]


@dataclass
class RadiographOptions:
    """Everything a radiograph-cache build needs besides the input and output paths."""

    size: int = 256
    workers: int = 1
    limit: int | None = None
    overwrite: bool = False  # redo subjects already in the cache
    progress: bool = True
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_voxels: int = MAX_VOXELS

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ConfigError(f"size={self.size}: expected at least 8 pixels")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: expected at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit}: expected at least 1")


def _report_text(findings: str, impression: str) -> str:
    return f"{findings}\n\n{impression}"


def drr_subject(source: CtSource, out: Path, options: RadiographOptions) -> None:
    """Project one CT into `out/<id>/`; raises `DataError` on bad input."""
    scan = load_ct(source, options.max_voxels)
    image, spacing_mm = drr(scan.hu, scan.affine, options.size)
    if scan.truth is not None:
        labels, labels_from = truth_labels(scan.truth), "truth"
    else:
        labels, labels_from = report_labels(_report_text(scan.findings, scan.impression)), "report"
    meta = {
        "source": source.source,
        "kind": "drr",
        "ct": scan.ct,
        "findings": scan.findings,
        "impression": scan.impression,
        "spacing_mm": round(spacing_mm, 6),
        "labels": labels,
        "labels_from": labels_from,
        "truth": str(scan.truth) if scan.truth else None,
        "projection": {
            "axis": "anterior-posterior (RAS axis 1), parallel beam",
            "mu_water_per_mm": MU_WATER,
            "window_water_mm": list(WINDOW_WET_MM),
            "view": "frontal as read: patient's right on the image's left, head at the top",
        },
    }
    write_radiograph(out, source.id, image, meta, overwrite=options.overwrite)


def radiograph_subject(subject: RadiographSubject, out: Path, options: RadiographOptions) -> None:
    """Decode, square and write one real radiograph into `out/<id>/`; raises `DataError` on bad input."""
    if subject.error:
        raise DataError(subject.error)
    findings, impression = load_report(subject)
    path = frontal_image(subject)
    image, pixel_mm = read_radiograph(path)
    from_report = report_labels(_report_text(findings, impression))
    given = {k: v for k, v in subject.labels.items() if v is not None}
    labels = {**from_report, **given}
    meta = {
        "source": subject.source,
        "kind": "radiograph",
        "image_file": str(path),
        "findings": findings,
        "impression": impression,
        "spacing_mm": round(pixel_mm * max(image.shape) / options.size, 6) if pixel_mm else None,
        "labels": labels,
        "labels_from": "input" if len(given) == 2 else "input+report" if given else "report",
    }
    write_radiograph(out, subject.id, square_image(image, options.size), meta, overwrite=options.overwrite)


def _check_out(out: Path, options: RadiographOptions) -> None:
    """Refuse an `out` holding anything but radiographs medsyn wrote, or ones of another size (unless
    `overwrite`), before any work."""
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        with open(manifest, encoding="utf-8", errors="replace") as f:
            header = f.readline().strip().split(",")
        if header != list(MANIFEST_COLUMNS):
            raise DataError(f"{manifest}: not a radiograph cache's manifest; choose another --out")
    for subject_id in finished_subjects(out):
        meta = read_meta(out, subject_id)
        if meta.get("encoding") != ENCODING:
            raise DataError(
                f"{out / subject_id}: not a radiograph medsyn wrote (encoding {meta.get('encoding')!r});"
                " choose another --out"
            )
        if meta.get("size") != options.size and not options.overwrite:
            raise DataError(
                f"{out}: holds radiographs of size {meta.get('size')} ({subject_id}); pass --size "
                f"{meta.get('size')} to resume, or --overwrite to redo them at {options.size}"
            )


_WORKER: dict = {}


def _init_worker(work: Callable, out: Path, options: RadiographOptions) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core
    _WORKER.update(work=work, out=out, options=options)


def _run_one(item) -> str | None:
    """Make one subject in a worker; return the failure reason or None."""
    try:
        _WORKER["work"](item, _WORKER["out"], _WORKER["options"])
    except DataError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - one bad subject must not stop the others
        return f"{item.source}: {type(err).__name__}: {' '.join(str(err).split())}"
    return None


def _build(items: Sequence, work: Callable, out: str | os.PathLike, options: RadiographOptions,
           desc: str) -> PrepareResult:  # fmt: skip
    """Run `work(item, out, options)` over the unfinished items (a process pool for workers > 1), then
    write failed.csv and the manifest."""
    out = Path(out)
    _check_out(out, options)
    if options.limit is not None:
        items = items[: options.limit]
    done = set(finished_subjects(out))
    redo = options.overwrite
    result = PrepareResult(skipped=[] if redo else [s.id for s in items if s.id in done])
    todo = [s for s in items if redo or s.id not in done]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=desc, unit="subject", disable=not options.progress or not todo)
    outcomes = []
    if options.workers == 1 or len(todo) <= 1:
        _init_worker(work, out, options)
        for item in todo:
            outcomes.append((item, _run_one(item)))
            bar.update()
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(
            min(options.workers, len(todo)),
            mp_context=multiprocessing.get_context(method),
            initializer=_init_worker,
            initargs=(work, out, options),
        ) as pool:
            futures = {pool.submit(_run_one, item): item for item in todo}
            for future in as_completed(futures):
                outcomes.append((futures[future], future.result()))
                bar.update()
    bar.close()
    order = {item.id: i for i, item in enumerate(todo)}
    for item, reason in sorted(outcomes, key=lambda o: order[o[0].id]):
        if reason is None:
            result.done.append(item.id)
        else:
            result.failed.append({"id": item.id, "source": item.source, "reason": reason})
    write_failed(out, result.failed)
    write_radiograph_manifest(out, options.split_fractions)
    return result


def make_drrs(
    input_path: str | os.PathLike, out: str | os.PathLike, options: RadiographOptions | None = None
) -> PrepareResult:
    """DRRs of every CT of a CT cache, phantoms folder or CT manifest into the radiograph cache `out`."""
    options = options or RadiographOptions()
    return _build(read_ct_sources(input_path), drr_subject, out, options, "drr")


def prepare_radiographs(
    input_path: str | os.PathLike, out: str | os.PathLike, options: RadiographOptions | None = None
) -> PrepareResult:
    """Every radiograph of a CSV or MIMIC-CXR folder into the radiograph cache `out`."""
    options = options or RadiographOptions()
    return _build(read_cxr_input(input_path), radiograph_subject, out, options, "prepare --cxr")
