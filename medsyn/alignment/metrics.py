"""Held-out measures of an alignment: retrieval accuracy both ways and matched vs unmatched similarity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def report_positives(texts: Sequence[str], others: Sequence[str] | None = None) -> torch.Tensor:
    """(len(texts), len(others)) bool: True where two reports are the same text (whitespace aside);
    `others` defaults to `texts`. Retrieving a subject whose report is the query's own text counts as
    a hit: the model cannot tell such subjects apart by their reports."""
    keys = [" ".join(t.split()) for t in texts]
    other_keys = keys if others is None else [" ".join(t.split()) for t in others]
    return torch.tensor([[a == b for b in other_keys] for a in keys], dtype=torch.bool).reshape(
        len(keys), len(other_keys)
    )


def retrieval_accuracy(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """Fraction of queries (rows of scores (Q, N)) whose `k` best candidates hold a positive
    (positives (Q, N) bool, e.g. the query's own volume and those whose report is the same text)."""
    k = min(int(k), scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (Q, k)
    hits = positives.to(scores.device).gather(1, top).any(1)  # (Q,)
    return int(hits.sum()) / hits.numel()


def chance_accuracy(positives: torch.Tensor, k: int) -> float:
    """The expected `retrieval_accuracy` of a random ranking: a query with p positives among N
    candidates finds one in its top k with probability 1 - C(N - p, k) / C(N, k)."""
    n, k = positives.shape[1], min(int(k), positives.shape[1])
    counts = positives.sum(1).tolist()
    return sum(1.0 - math.comb(n - int(p), k) / math.comb(n, k) for p in counts) / len(counts)


def retrieval_metrics(
    report_scores: torch.Tensor,
    positives: torch.Tensor,
    volume_scores: torch.Tensor | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of report -> volume retrieval by the rows of report_scores (N reports,
    N volumes) and of volume -> report retrieval by the columns of volume_scores (N reports, N volumes;
    default report_scores); keys `{prefix}report_to_volume_top1` etc. (chance: `chance_accuracy`)."""
    volume_scores = report_scores if volume_scores is None else volume_scores
    out = {}
    for name, s, p in (
        ("report_to_volume", report_scores, positives),
        ("volume_to_report", volume_scores.T, positives.T),
    ):
        for k in (1, 5):
            out[f"{prefix}{name}_top{k}"] = retrieval_accuracy(s, p, k)
    return out


def similarity_gap(similarity: torch.Tensor, positives: torch.Tensor) -> dict[str, float | None]:
    """Mean similarity (N, N) of matched pairs (the diagonal) and of unmatched ones (pairs whose reports
    differ, None when there are none); a well aligned model keeps the first well above the second."""
    unmatched = ~positives.to(similarity.device)
    return {
        "matched_similarity": float(similarity.diagonal().mean()),
        "unmatched_similarity": float(similarity[unmatched].mean()) if bool(unmatched.any()) else None,
    }
