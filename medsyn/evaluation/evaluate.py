"""`medsyn evaluate`: measure generated volumes against real ones and audit them for memorization.

Every volume is read once: samples and real volumes are measured (`measures.measure_volume`, the CT
re-segmented by the backend, plus their own masks when present) and get 3D and 2.5D features; training
volumes get features and a voxel signature for the memorization audit. Then the distribution
distances (FID, MMD, 2.5D FID, Wasserstein distance of every measure), the audit, with an align run
the report-volume alignment score of the samples against their prompts (`medsyn.evaluation.alignment`),
and the outputs: metrics.json, report.md and plots (see `medsyn.evaluation.report`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from medsyn.errors import DataError
from medsyn.evaluation import audit as audit_lib
from medsyn.evaluation import features as features_lib
from medsyn.evaluation.measures import MEASURES, measure_volume
from medsyn.evaluation.volumes import VolumeRef, find_volumes, load_volume, read_truth

ROLES = ("samples", "real", "train")
# phantom truth.json key -> measure key, for the measured-vs-truth table of held-out phantoms
TRUTH_KEYS = {
    "effusion_ml": "effusion_ml",
    "effusion_ml_left": "effusion_left_ml",
    "effusion_ml_right": "effusion_right_ml",
    "ctr": "ctr",
    "laa950_percent": "laa950_pct",
    "lung_volume_ml": "lung_ml",
}


@dataclass
class EvaluateOptions:
    """How to measure: segmentation backend, feature weights, audit settings, parallelism."""

    backend: str = "threshold"
    features: str | None = None  # MedicalNet-style 3D ResNet weights; None: a fixed random network
    features_2d: str | None = None  # 2D ResNet weights for the 2.5D FID; None: a fixed random network
    feature_size: int = 128  # the 3D network's input cube (voxels) and the 2D network's slice size
    slices_per_plane: int = 16  # 2.5D FID: slices per plane and volume
    voxel_size: int = 32  # voxel-space signature grid of the audit
    percentile: float = 1.0  # near-copy threshold: this percentile of held-out-to-train distances
    workers: int = 1
    device: str = "cpu"
    progress: bool | None = None  # tqdm bar (None: on a terminal)
    cache_grid: str = "hr"  # which stack of a prepared cache --real / --train read: hr, or lr (the base grid)
    align: str | None = None  # a `train.py align` run: score samples against their prompts (`alignment`)


@dataclass
class Evaluation:
    """The result of `evaluate`: the metrics (metrics.json's contents) and the audit (for its plot)."""

    metrics: dict[str, Any]
    audit: audit_lib.AuditResult
    samples: dict[str, VolumeRef]  # id -> where each evaluated sample lives (its preview, for the montage)


@dataclass
class Item:
    """One distinct volume and what it is used as (samples / real / train)."""

    ref: VolumeRef
    roles: set[str] = field(default_factory=set)


@dataclass
class Processed:
    """What one volume gave: measures (samples, real), features and the audit's voxel signature."""

    measures: dict | None = None
    features: np.ndarray | None = None  # (D,)
    slices: dict[str, np.ndarray] | None = None  # plane -> (n, D2)
    voxels: np.ndarray | None = None
    error: str | None = None


_WORKER: dict[str, Any] = {}


def _setup(options: EvaluateOptions, threads: int | None, extractor=None) -> None:
    """Per-process state: the segmentation backend and the feature networks, built once."""
    import torch

    from medsyn.data.segment import get_backend

    if threads:
        torch.set_num_threads(threads)
    _WORKER["backend"] = get_backend(options.backend)
    _WORKER["extractor"] = extractor or build_extractor(options)
    _WORKER["voxel_size"] = options.voxel_size


def build_extractor(options: EvaluateOptions) -> features_lib.FeatureExtractor:
    """The 3D and 2D feature networks `options` ask for (fixed random ones without weights)."""
    return features_lib.build_feature_extractor(
        options.features, options.features_2d, device=options.device, input_size=options.feature_size,
        slice_size=options.feature_size, slices_per_plane=options.slices_per_plane,
    )  # fmt: skip


def _process(item: Item) -> Processed:
    """Load one volume and compute what its roles need; a failure becomes the item's error."""
    try:
        volume = load_volume(item.ref)
        extractor = _WORKER["extractor"]
        measured = item.roles & {"samples", "real"}
        out = Processed(
            features=extractor.features_3d(volume.hu, volume.spacing),
            voxels=audit_lib.voxel_signature(volume.hu, _WORKER["voxel_size"]),
        )
        if measured:
            out.measures = measure_volume(volume.hu, volume.affine, volume.masks or None, _WORKER["backend"])
            out.slices = extractor.features_25d(volume.hu, volume.spacing)
        return out
    except Exception as err:  # a long job reports a bad volume and carries on with the rest
        return Processed(error=f"{type(err).__name__}: {' '.join(str(err).split())}")


def collect(sources: dict[str, list[VolumeRef]]) -> list[Item]:
    """The distinct volumes of all roles (a real volume that is also a training volume is read once)."""
    items: dict[str, Item] = {}
    for role, refs in sources.items():
        for ref in refs:
            key = str(Path(ref.source).resolve()) if role != "samples" else f"samples:{ref.source}"
            items.setdefault(key, Item(ref)).roles.add(role)
    return list(items.values())


def process_all(items: Sequence[Item], options: EvaluateOptions, extractor=None) -> list[Processed]:
    """`_process` every item, in `options.workers` processes, with a progress bar.

    `extractor`: the feature networks already built in this process (used when not in workers).
    """
    bar = tqdm(total=len(items), desc="evaluate", unit="volume",
               disable=None if options.progress is None else not options.progress)  # fmt: skip
    results: list[Processed] = []
    try:
        if options.workers <= 1 or len(items) < 2:
            _setup(options, None, extractor)
            for item in items:
                results.append(_process(item))
                bar.update()
        else:
            workers = min(options.workers, len(items))
            threads = max(1, (os.cpu_count() or 1) // workers)
            context = multiprocessing.get_context("spawn")  # no forked torch thread pools
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_setup,
                                     initargs=(options, threads)) as pool:  # fmt: skip
                for result in pool.map(_process, items):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


def mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def _scalar(measures: dict, key: str) -> float | None:
    value = measures.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(samples: dict[str, dict], real: dict[str, dict]) -> dict[str, dict]:
    """`{MEASURE: {"samples": {mean, sd}, "real": {mean, sd}}}` over the scalar measures present."""
    present = [
        k for k in MEASURES if any(_scalar(m, k) is not None for m in (*samples.values(), *real.values()))
    ]
    return {
        key: {group: mean_sd([_scalar(m, key) for m in ms.values()]) for group, ms in
              (("samples", samples), ("real", real))}
        for key in present
    }  # fmt: skip


def wasserstein(samples: dict[str, dict], real: dict[str, dict]) -> dict[str, float]:
    """Wasserstein-1 distance between the samples' and the real volumes' values of each measure."""
    out = {}
    for key in MEASURES:
        a = [v for v in (_scalar(m, key) for m in samples.values()) if v is not None]
        b = [v for v in (_scalar(m, key) for m in real.values()) if v is not None]
        if a and b:
            out[key] = float(stats.wasserstein_distance(a, b))
    return out


def truth_comparison(refs: Sequence[VolumeRef], measured: dict[str, dict]) -> dict[str, dict]:
    """For phantoms with truth.json: `{id: {measure: {"measured", "truth", "error"}}}`."""
    out = {}
    for ref in refs:
        if ref.id not in measured:
            continue
        truth = read_truth(ref)
        if truth is None:
            continue
        row = {}
        for truth_key, key in TRUTH_KEYS.items():
            value, true = _scalar(measured[ref.id], key), truth.get(truth_key)
            if value is not None and isinstance(true, (int, float)):
                row[key] = {"measured": value, "truth": float(true), "error": value - float(true)}
        out[ref.id] = row
    return out


def distribution(results: dict[str, list[Processed]], extractor_info: dict) -> dict[str, Any]:
    """FID and MMD on 3D features, the 2.5D FID, each named after the features they were computed on."""
    a = [r.features for r in results["samples"]]
    b = [r.features for r in results["real"]]
    out: dict[str, Any] = {"features": extractor_info, "n_samples": len(a), "n_real": len(b)}
    name_3d = features_lib.metric_name("FID", extractor_info["trained_3d"])
    name_mmd = features_lib.metric_name("MMD", extractor_info["trained_3d"])
    name_25d = features_lib.metric_name("2.5D FID", extractor_info["trained_2d"])
    if len(a) >= 2 and len(b) >= 2:
        out["fid_3d"] = {"value": features_lib.fid(np.stack(a), np.stack(b)), "metric": name_3d,
                         "features": extractor_info["label_3d"]}  # fmt: skip
        out["mmd_3d"] = {"value": features_lib.mmd(np.stack(a), np.stack(b)), "metric": name_mmd,
                         "features": extractor_info["label_3d"]}  # fmt: skip
        planes = features_lib.fid_25d(
            [r.slices for r in results["samples"]], [r.slices for r in results["real"]]
        )
        out["fid_25d"] = {**planes, "metric": name_25d, "features": extractor_info["label_2d"]}
    else:
        out["note"] = "FID and MMD need at least 2 samples and 2 real volumes"
    return out


def evaluate(
    samples: str | os.PathLike,
    real: str | os.PathLike,
    train: str | os.PathLike | None = None,
    options: EvaluateOptions | None = None,
    real_split: str | None = None,
    train_split: str | None = None,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Measure `samples` against `real` and audit them against `train` (default: `real`, leave-one-out).

    `report.write_outputs` writes the result's files.
    """
    options = options or EvaluateOptions()
    if options.workers < 1:
        raise DataError(f"--workers {options.workers}: expected a positive number of processes")
    sources = {
        "samples": find_volumes(samples),
        "real": find_volumes(real, real_split, options.cache_grid),
        "train": find_volumes(
            train if train is not None else real,
            train_split if train is not None else real_split,
            options.cache_grid,
        ),
    }
    for role, refs in sources.items():
        ids = [r.id for r in refs]
        if len(set(ids)) != len(ids):
            raise DataError(f"--{role}: volume ids are not unique ({len(ids) - len(set(ids))} repeated)")
    log(f"medsyn evaluate: {len(sources['samples'])} sample(s), {len(sources['real'])} real, "
        f"{len(sources['train'])} training volume(s); backend {options.backend}")  # fmt: skip
    from medsyn.data.segment import get_backend

    get_backend(options.backend)  # an unknown backend or bad weights fail here, before any volume is read
    align = None
    if options.align is not None:  # a bad run fails here too
        from medsyn.alignment.maps import align_grid
        from medsyn.alignment.run import load_align_run

        align = load_align_run(options.align, options.device)
        align_grid(align)
    extractor = build_extractor(options)
    info = {"label_3d": extractor.label_3d, "label_2d": extractor.label_2d,
            "trained_3d": extractor.trained_3d, "trained_2d": extractor.trained_2d}  # fmt: skip
    items = collect(sources)
    processed = process_all(items, options, extractor)
    by_role: dict[str, dict[str, Processed]] = {role: {} for role in ROLES}  # role -> key -> result
    names: dict[str, str] = {}  # key -> the volume's id (train and real volumes are keyed by their file)
    failed = []
    for item, result in zip(items, processed, strict=True):
        if result.error is not None:
            failed.append({"id": item.ref.id, "source": item.ref.source, "roles": sorted(item.roles),
                           "reason": result.error})  # fmt: skip
            log(f"skipped {item.ref.source}: {result.error}")
            continue
        for role in item.roles:
            key = item.ref.id if role == "samples" else str(Path(item.ref.source).resolve())
            by_role[role][key] = result
            names[key] = item.ref.id
    for role in ("samples", "real"):
        if not by_role[role]:
            raise DataError(f"--{role}: none of the {len(sources[role])} volume(s) could be evaluated "
                            f"(first problem: {failed[0]['reason'] if failed else 'none found'})")  # fmt: skip
    if len(by_role["real"]) < 2:
        raise DataError("--real: the memorization audit needs at least 2 held-out volumes")
    if not by_role["train"]:
        raise DataError("--train: none of the training volumes could be read")

    def vectors(role: str) -> dict[str, dict[str, np.ndarray]]:
        return {k: {"features": r.features, "voxels": r.voxels} for k, r in by_role[role].items()}

    # held-out and training volumes are matched by file, so the same volume in both is left out of its
    # own reference distance (leave-one-out) while two datasets that reuse ids are still told apart
    result_audit = audit_lib.memorization_audit(
        vectors("samples"), vectors("train"), vectors("real"), percentile=options.percentile
    )
    for sample in result_audit.samples.values():
        for space in ("nearest_train", "nearest_train_voxels"):
            sample[space] = {"id": names[sample[space]["id"]], "distance": float(sample[space]["distance"])}
    result_audit.reference_ids = [names[k] for k in result_audit.reference_ids]
    refs = {role: {r.id: r for r in sources[role]} for role in ROLES}
    samples_out, real_out = {}, {}
    for key, result in by_role["samples"].items():
        ref = refs["samples"][key]
        samples_out[key] = {**result.measures, **result_audit.samples[key], "prompt": ref.prompt,
                            "source": ref.source}  # fmt: skip
    for key, result in by_role["real"].items():
        real_out[names[key]] = {**result.measures, "source": refs["real"][names[key]].source}
    groups = {role: [by_role[role][k] for k in by_role[role]] for role in ("samples", "real")}
    metrics = {
        "samples": samples_out,
        "real": real_out,
        "distribution": {**distribution(groups, info), "wasserstein": wasserstein(samples_out, real_out)},
        "summary": summarize(samples_out, real_out),
        "audit": result_audit.to_dict(),
        "truth": {
            "samples": truth_comparison(sources["samples"], samples_out),
            "real": truth_comparison(sources["real"], real_out),
        },
        "failed": failed,
        "inputs": {
            "samples": str(samples),
            "real": str(real),
            "train": str(train if train is not None else real),
            "train_is_real": train is None,
            "real_split": real_split,
            "train_split": train_split,
            "cache_grid": options.cache_grid,
            "backend": options.backend,
            "voxel_size": options.voxel_size,
            "percentile": options.percentile,
            "feature_size": options.feature_size,
            "slices_per_plane": options.slices_per_plane,
            "align": None if options.align is None else str(options.align),
        },
    }
    if align is not None:
        from medsyn.evaluation.alignment import alignment_scores

        scores = alignment_scores(align, sources["samples"], sources["real"],
                                  lambda: get_backend(options.backend), log)  # fmt: skip
        metrics["alignment"] = scores
        for group, out in (("samples", samples_out), ("real", real_out)):
            for key, value in scores[group].items():
                if key in out:
                    out[key]["alignment"] = value
    return Evaluation(metrics, result_audit, {k: refs["samples"][k] for k in samples_out})
