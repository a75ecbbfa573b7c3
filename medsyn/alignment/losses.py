"""Contrastive losses of `train.py align`: global report-volume InfoNCE and local word-patch alignment.

- global: CLIP's symmetric InfoNCE on one embedding per report and per volume;
- local, in the manner of FILIP / GLoRIA: each word is compared with every patch of a volume and keeps
  its best match ("max", or a softmax-attention weighted similarity, "softmax"); the mean over the
  report's words is the report -> volume score. Each patch likewise keeps its best word; the mean over
  patches is the volume -> report score. Both score matrices are trained contrastively.

Embeddings come L2-normalised, so similarities are cosines. Each loss returns one value per pair (B,);
the caller reduces. (Two pairs of a batch with the same report text need no special care: their
embeddings are equal, and summed over the two, the one-hot targets pull and push exactly as targets
spread over both would.)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

LOCAL_POOLS = ("max", "softmax")


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (B, B) against its diagonal entry. Returns (B,)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits.float(), target, reduction="none")


def global_contrastive_loss(
    reports: torch.Tensor, volumes: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) of paired embeddings.

    reports, volumes: (B, D) L2-normalised, row i of each from pair i; logit_scale: () 1 / temperature.
    Returns (B,): the mean of report i's report->volume loss and volume i's volume->report loss.
    """
    logits = logit_scale * reports @ volumes.T  # (B, B), rows: reports
    return 0.5 * (info_nce(logits) + info_nce(logits.T))


def word_patch_scores(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    patches: torch.Tensor,
    pool: str = "max",
    softmax_temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-grained scores of every report against every volume.

    words: (R, W, D) normalised word embeddings with word_mask (R, W) False at padding words;
    patches: (V, P, D) normalised patch embeddings. pool: over the patches of a word (and the words of
    a patch), "max" similarity or "softmax", the similarity averaged with weights softmax(sim / T).
    Returns (report_to_volume (R, V): the mean over a report's words of each word's pooled similarity;
    volume_to_report (R, V): the mean over a volume's patches of each patch's pooled similarity over
    the report's words). A report without words scores 0.
    """
    if pool not in LOCAL_POOLS:
        raise ValueError(f"pool={pool!r}: expected one of {', '.join(LOCAL_POOLS)}")
    sim = torch.einsum("rwd,vpd->rvwp", words, patches)  # (R, V, W, P)
    mask = word_mask[:, None, :, None]  # (R, 1, W, 1)
    low = torch.finfo(sim.dtype).min  # finite: a report without words gives no NaN, in values or gradients
    if pool == "max":
        word_best = sim.amax(-1)  # (R, V, W)
        patch_best = sim.masked_fill(~mask, low).amax(-2)  # (R, V, P)
    else:
        t = float(softmax_temperature)
        word_best = (F.softmax(sim / t, dim=-1) * sim).sum(-1)
        patch_best = (F.softmax((sim / t).masked_fill(~mask, low), dim=-2) * sim).sum(-2)
    has_words = word_mask.any(1)[:, None]  # (R, 1)
    count = word_mask.sum(1).clamp(min=1)[:, None]  # (R, 1)
    report_to_volume = (word_best * word_mask[:, None, :]).sum(-1) / count  # (R, V)
    volume_to_report = torch.where(has_words, patch_best.mean(-1), torch.zeros_like(patch_best[..., 0]))
    return report_to_volume, volume_to_report


def local_contrastive_loss(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    patches: torch.Tensor,
    logit_scale: torch.Tensor,
    pool: str = "max",
    softmax_temperature: float = 0.1,
) -> torch.Tensor:
    """Symmetric InfoNCE of the word-patch scores (`word_patch_scores`) of paired reports and volumes.

    words: (B, W, D), word_mask: (B, W), patches: (B, P, D), pair i = report i with volume i;
    logit_scale: () 1 / temperature. Returns (B,): the mean of report i's loss over the volumes (word ->
    patch scores) and volume i's loss over the reports (patch -> word scores).
    """
    report_to_volume, volume_to_report = word_patch_scores(
        words, word_mask, patches, pool, softmax_temperature
    )
    return 0.5 * (info_nce(logit_scale * report_to_volume) + info_nce(logit_scale * volume_to_report.T))
