"""`medsyn prepare` as a function: read inputs, preprocess, segment, write the cache.

Each subject is validated (its volumes' headers first: voxel count, file size, field of view, so a
hostile header costs nothing), loaded, resampled to the RAS grid, given masks (from the manifest when
given, else from the segmentation backend), encoded to the 4-channel stack, downsampled, and written
atomically. A bad subject is recorded in `failed.csv` with its reason and the rest go on. Subjects
already in the cache are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsyn.data import cache
from medsyn.data.channels import MASK_CHANNELS, NUM_LOBE_LABELS, encode_volume
from medsyn.data.preprocess import PreprocessConfig, apply_rescale, override_spacing, to_grid
from medsyn.data.readers import MAX_VOXELS, Subject, Volume, open_volume, read_input
from medsyn.data.segment import DEFAULT_BACKEND, Segmenter, get_backend, segment
from medsyn.errors import ConfigError, DataError

MIN_EXTENT_MM = 100.0  # a chest CT covers at least this along every axis (--min-extent-mm)


@dataclass
class PrepareOptions:
    """Everything `prepare` needs besides the input and output paths."""

    backend: str = DEFAULT_BACKEND
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    lr_factor: int = 4
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    workers: int = 1
    limit: int | None = None
    progress: bool = True
    max_voxels: int = MAX_VOXELS  # a volume whose header claims more is refused unread
    min_extent_mm: float = MIN_EXTENT_MM  # a CT smaller than this along any axis is refused

    def __post_init__(self) -> None:
        if any(s % self.lr_factor for s in self.preprocess.shape):
            raise ConfigError(f"size {self.preprocess.size}: must be divisible by lr_factor={self.lr_factor}")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: expected at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit}: expected at least 1")
        if self.max_voxels < 1:
            raise ConfigError(f"max_voxels={self.max_voxels}: expected at least 1")
        if not self.min_extent_mm >= 0:
            raise ConfigError(f"min_extent_mm={self.min_extent_mm}: expected a non-negative length in mm")
        cache.split_for("x", self.split_fractions)  # validates the fractions


@dataclass
class PrepareResult:
    """Ids prepared in this run, ids skipped as already cached, and failures with their reasons."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        return bool(self.failed) and not self.done and not self.skipped


def _check_extent(path: Path, shape: tuple[int, ...], affine: np.ndarray, min_extent_mm: float) -> None:
    """Refuse a volume smaller than `min_extent_mm` along any axis (a stray slab, a 1-voxel file)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.asarray(shape[:3]) * spacing
    if extent.min() < min_extent_mm:
        mm = " x ".join(f"{e:.4g}" for e in extent)
        raise DataError(
            f"{path}: field of view {mm} mm (shape {tuple(shape)}) is smaller than the minimum"
            f" {min_extent_mm:g} mm per axis for a chest CT (--min-extent-mm)"
        )


def _open_masks(subject: Subject, shape: tuple[int, ...], max_voxels: int) -> dict[str, Volume]:
    """The given masks' headers, checked against the CT's shape before any voxel is read."""
    masks = {}
    for name, path in subject.masks.items():
        mask = open_volume(path, max_voxels)
        if mask.shape != shape:
            raise DataError(f"{path}: mask shape mismatch: {name} is {mask.shape}, ct is {shape}")
        masks[name] = mask
    return masks


def _read_masks(masks: dict[str, Volume]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, volume in masks.items():
        mask, path = volume.read(), volume.path
        if not np.isfinite(mask).all():
            raise DataError(f"{path}: {name} mask has NaN or infinite voxels")
        if name == "lobes" and (mask.min() < 0 or mask.max() > NUM_LOBE_LABELS):
            raise DataError(
                f"{path}: lobe labels must be in 0..{NUM_LOBE_LABELS}, got {mask.min()}..{mask.max()}"
            )
        arrays[name] = np.rint(mask).astype(np.uint8) if name == "lobes" else (mask > 0).astype(np.uint8)
    return arrays


def prepare_subject(subject: Subject, out: Path, options: PrepareOptions, backend: Segmenter | None) -> None:
    """Prepare one subject into `out/<id>/`; raises `DataError` on bad input.

    Every header (CT and masks) is checked before any voxel is read, so a file whose header claims
    gigabytes costs nothing.
    """
    subject.check()
    volume = open_volume(subject.ct, options.max_voxels)
    affine = volume.affine if subject.spacing is None else override_spacing(volume.affine, subject.spacing)
    _check_extent(subject.ct, volume.shape, affine, options.min_extent_mm)
    mask_volumes = _open_masks(subject, volume.shape, options.max_voxels)
    hu = volume.read()
    if not np.isfinite(hu).all():
        raise DataError(f"{subject.ct}: CT has {int((~np.isfinite(hu)).sum())} NaN or infinite voxels")
    if subject.rescale is not None:
        hu = apply_rescale(hu, *subject.rescale)
    given = _read_masks(mask_volumes)
    ct, given, grid_affine = to_grid(hu, affine, given, options.preprocess)
    missing = [c for c in MASK_CHANNELS if c not in given]
    masks = segment(ct, grid_affine, backend if missing else None, given=given)
    hr = encode_volume({"ct": ct, **masks})
    lr = cache.downsample(hr, options.lr_factor)
    lr_affine = grid_affine.copy()
    lr_affine[:3, :3] *= options.lr_factor
    lr_affine[:3, 3] = grid_affine[:3, 3]  # voxel 0 of lr is voxel 0 of hr
    meta = {
        "id": subject.id,
        "source": subject.source,
        "ct": str(subject.ct),
        "findings": subject.findings,
        "impression": subject.impression,
        "size": int(hr.shape[1]),
        "lr_size": int(lr.shape[1]),
        "spacing_mm": float(abs(grid_affine[0, 0])),
        "fit": options.preprocess.fit,
        "affine": grid_affine.tolist(),
        "lr_affine": lr_affine.tolist(),
        "masks": {c: ("input" if c in subject.masks else options.backend) for c in MASK_CHANNELS},
    }
    cache.write_subject(out, subject.id, hr, lr, meta)


_WORKER: dict = {}


def _init_worker(out: Path, options: PrepareOptions) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core
    _WORKER.update(out=out, options=options, backend=None)


def _run_one(subject: Subject) -> str | None:
    """Prepare one subject in a worker; return the failure reason or None."""
    if _WORKER["backend"] is None:
        _WORKER["backend"] = get_backend(_WORKER["options"].backend)
    try:
        prepare_subject(subject, _WORKER["out"], _WORKER["options"], _WORKER["backend"])
    except DataError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - one bad subject must not stop the others
        return f"{subject.source}: {type(err).__name__}: {err}"
    return None


def prepare(
    input_path: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions | None = None
) -> PrepareResult:
    """Prepare every subject of a manifest CSV or CT-RATE directory into the cache at `out`."""
    options = options or PrepareOptions()
    out = Path(out)
    get_backend(options.backend)  # an unknown backend or a missing package fails before any work
    subjects = read_input(input_path, check=False)
    if options.limit is not None:
        subjects = subjects[: options.limit]
    result = PrepareResult(skipped=[s.id for s in subjects if cache.is_done(out, s.id)])
    todo = [s for s in subjects if not cache.is_done(out, s.id)]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="prepare", unit="subject", disable=not options.progress or not todo)
    outcomes: list[tuple[Subject, str | None]] = []
    if options.workers == 1 or len(todo) <= 1:
        _init_worker(out, options)
        for subject in todo:
            outcomes.append((subject, _run_one(subject)))
            bar.update()
    else:
        # fork as torch's DataLoader does (workers set one thread); spawn where fork does not exist
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        workers = min(options.workers, len(todo))
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(out, options)
        ) as pool:
            futures = {pool.submit(_run_one, s): s for s in todo}
            for future in as_completed(futures):
                outcomes.append((futures[future], future.result()))
                bar.update()
    bar.close()
    order = {s.id: i for i, s in enumerate(todo)}
    for subject, reason in sorted(outcomes, key=lambda o: order[o[0].id]):
        if reason is None:
            result.done.append(subject.id)
        else:
            result.failed.append({"id": subject.id, "source": subject.source, "reason": reason})
    cache.write_failed(out, result.failed)
    cache.write_manifest(out, options.split_fractions)
    return result


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """`"0.8,0.1,0.1"` -> (0.8, 0.1, 0.1)."""
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError as err:
        raise ConfigError(f"split fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from err
    if len(values) != 3:
        raise ConfigError(f"split fractions {text!r}: expected three numbers like 0.8,0.1,0.1")
    return values  # type: ignore[return-value]
