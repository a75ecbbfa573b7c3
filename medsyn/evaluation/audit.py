"""Memorization audit: is a generated CT a near copy of a training volume?

Synthetic CTs are shared in place of patient data, so a sample that reproduces a training volume leaks
it. For each sample we find its nearest training volume in two spaces (network features, and a coarse
voxel signature) and compare that distance with how close real unseen volumes come to the training
set: each held-out volume's nearest-training distance forms the reference distribution, and a sample
strictly closer than its `percentile`-th percentile in both spaces is flagged as a near copy. (A copy is
close in both; asking for both keeps honest samples from being flagged by chance when the reference is
small: with N held-out volumes and N < 100 / percentile, the threshold is their minimum, which an honest
sample undercuts in one space with probability about 1 / (N + 1).)
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.spatial.distance import cdist

from medsyn.evaluation.features import HU_RANGE, resize_volume
from medsyn.io import atomic_path

# space -> distance: Euclidean for network features, RMS (per-voxel units) for voxel signatures
SPACES = {"features": "euclidean", "voxels": "rms"}


def voxel_signature(hu: np.ndarray, size: int = 32) -> np.ndarray:
    """The CT clipped to HU_RANGE, area-downsampled (or linearly upsampled) to size^3, scaled to [-1, 1],
    flattened: (size^3,) float32."""
    x = torch.from_numpy(np.clip(np.asarray(hu, dtype=np.float32), *HU_RANGE))[None, None]
    x = resize_volume(x, (size,) * 3)
    x = (x - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]) * 2 - 1
    return x.flatten().numpy().astype(np.float32)


def nearest(
    queries: np.ndarray,
    references: np.ndarray,
    query_ids: Sequence[Hashable] | None = None,
    reference_ids: Sequence[Hashable] | None = None,
    metric: str = "euclidean",
) -> tuple[np.ndarray, np.ndarray]:
    """Index and distance of each query's nearest reference, queries (n, d), references (m, d).

    A reference with the same id as the query is skipped (leave-one-out when queries are references).
    `metric`: "euclidean", or "rms" (Euclidean / sqrt(d): the same units whatever d is).
    """
    if metric not in ("euclidean", "rms"):
        raise ValueError(f"metric={metric!r}: expected 'euclidean' or 'rms'")
    queries, references = np.atleast_2d(queries), np.atleast_2d(references)
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"queries {queries.shape} and references {references.shape} differ in dimension")
    dist = cdist(queries.astype(np.float64), references.astype(np.float64))  # (n, m)
    if metric == "rms":
        dist /= np.sqrt(queries.shape[1])
    if query_ids is not None and reference_ids is not None:
        same = np.array([[q == r for r in reference_ids] for q in query_ids], dtype=bool).reshape(dist.shape)
        dist[same] = np.inf
    index = dist.argmin(axis=1)
    distance = dist[np.arange(len(dist)), index]
    if not np.isfinite(distance).all():
        raise ValueError("nearest: a query has no reference other than itself")
    return index, distance


@dataclass
class AuditResult:
    """Per-sample nearest training volumes and near-copy flags, with the thresholds they were judged by."""

    samples: dict  # id -> {"nearest_train": {"id", "distance"}, "nearest_train_voxels": {...}, "near_copy"}
    thresholds: dict[str, float]  # space -> distance below which a sample is a near copy
    reference_distances: dict[str, np.ndarray]  # space -> held-out volumes' nearest-train distances
    reference_ids: list  # held-out ids, in the order of reference_distances
    percentile: float
    leave_one_out: bool  # held-out ids overlapped training ids (and were skipped as their own neighbours)

    @property
    def near_copies(self) -> list:
        return [i for i, s in self.samples.items() if s["near_copy"]]

    def to_dict(self) -> dict:
        """JSON-serialisable summary (ids as strings)."""
        return {
            "percentile": float(self.percentile),
            "leave_one_out": self.leave_one_out,
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "n_near_copies": len(self.near_copies),
            "near_copies": [str(i) for i in self.near_copies],
            "reference": {
                "ids": [str(i) for i in self.reference_ids],
                **{k: [float(x) for x in v] for k, v in self.reference_distances.items()},
            },
            "samples": {
                str(i): {
                    "nearest_train": {
                        "id": str(s["nearest_train"]["id"]),
                        "distance": float(s["nearest_train"]["distance"]),
                    },
                    "nearest_train_voxels": {
                        "id": str(s["nearest_train_voxels"]["id"]),
                        "distance": float(s["nearest_train_voxels"]["distance"]),
                    },
                    "near_copy": bool(s["near_copy"]),
                }
                for i, s in self.samples.items()
            },
        }


def _stack(volumes: dict, space: str, what: str) -> np.ndarray:
    missing = [i for i, v in volumes.items() if space not in v]
    if missing:
        raise ValueError(f"{what} {missing[0]!r} (and {len(missing) - 1} more) has no {space!r} vector")
    return np.stack([np.asarray(v[space], dtype=np.float64).ravel() for v in volumes.values()])


def memorization_audit(samples: dict, train: dict, heldout: dict, percentile: float = 1.0) -> AuditResult:
    """Flag samples that are near copies of training volumes.

    Each argument maps an id to {"features": vector, "voxels": voxel_signature}. Per space, the reference
    distribution is each held-out volume's distance to its nearest training volume (a training volume
    with the same id is skipped: passing the training set as `heldout` gives leave-one-out). The
    threshold is its `percentile`-th percentile taken as one of its values (numpy method="lower"), so
    at most `percentile`% of held-out volumes lie strictly below it; with fewer than 100 / percentile + 1
    values it is the minimum and none does. A sample is a near copy when it is strictly closer than the
    threshold to some training volume in both spaces. Samples are compared with every training volume,
    whatever their ids.
    """
    if len(heldout) < 2:
        raise ValueError(
            f"memorization_audit: needs at least 2 held-out volumes for a reference, got {len(heldout)}"
        )
    if not train or not samples:
        raise ValueError(
            f"memorization_audit: needs samples and training volumes, got {len(samples)} and {len(train)}"
        )
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile={percentile}: expected a value in [0, 100]")
    train_ids, heldout_ids, sample_ids = list(train), list(heldout), list(samples)
    thresholds, reference, found = {}, {}, {}
    for space, metric in SPACES.items():
        train_x = _stack(train, space, "training volume")
        _, ref = nearest(_stack(heldout, space, "held-out volume"), train_x, heldout_ids, train_ids, metric)
        reference[space] = ref
        thresholds[space] = float(np.percentile(ref, percentile, method="lower"))
        found[space] = nearest(_stack(samples, space, "sample"), train_x, metric=metric)
    per_sample = {}
    for n, sid in enumerate(sample_ids):
        near = {
            space: {"id": train_ids[found[space][0][n]], "distance": float(found[space][1][n])}
            for space in SPACES
        }
        per_sample[sid] = {
            "nearest_train": near["features"],
            "nearest_train_voxels": near["voxels"],
            "near_copy": all(near[s]["distance"] < thresholds[s] for s in SPACES),
        }
    return AuditResult(
        samples=per_sample,
        thresholds=thresholds,
        reference_distances=reference,
        reference_ids=heldout_ids,
        percentile=percentile,
        leave_one_out=bool(set(heldout_ids) & set(train_ids)),
    )


def plot_audit(result: AuditResult, path: str | os.PathLike) -> None:
    """PNG: per space, histograms of held-out and sample nearest-training distances and the threshold."""
    fig = Figure(figsize=(5 * len(SPACES), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    key = {"features": "nearest_train", "voxels": "nearest_train_voxels"}
    for ax, space in zip(fig.subplots(1, len(SPACES), squeeze=False)[0], SPACES, strict=True):
        ref = result.reference_distances[space]
        gen = np.array([s[key[space]]["distance"] for s in result.samples.values()])
        bins = np.histogram_bin_edges(np.concatenate([ref, gen]), bins=20)
        ax.hist(ref, bins=bins, alpha=0.6, label=f"held-out -> train (n={len(ref)})")
        ax.hist(gen, bins=bins, alpha=0.6, label=f"samples -> train (n={len(gen)})")
        ax.axvline(
            result.thresholds[space],
            color="k",
            ls="--",
            label=f"threshold (percentile {result.percentile:g})",
        )
        unit = (
            "Euclidean distance"
            if SPACES[space] == "euclidean"
            else "RMS distance (HU window scaled to [-1, 1])"
        )
        ax.set(title=f"Nearest training volume: {space}", xlabel=unit, ylabel="volumes")
        ax.legend(fontsize=8)
    n = len(result.near_copies)
    fig.suptitle(f"Memorization audit: {n} of {len(result.samples)} samples flagged as near copies")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
