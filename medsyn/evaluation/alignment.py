"""The report-volume alignment score of `medsyn evaluate --align RUN`.

Each generated sample is scored against the prompt it was generated from with a trained align run
(`medsyn.alignment`), on the run's base grid (`align_input`: a sample on the high-resolution or the SR
output grid is brought there as the cache made the run's training data):
- `global`: the cosine similarity of the report and volume embeddings, like the CLIP score the VLM3D
  challenge computes with CT-CLIP;
- `fine`: the mean over the prompt's words of each word's best word-patch similarity.

A score means little alone, so the held-out real volumes are scored the same way with their own reports
(`matched`) and with the other real reports (`mismatched`: per volume the mean over the reports whose
text differs from its own, at most `MISMATCHED_REPORTS` of them). Each group gets its mean and a
bootstrap standard error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from medsyn.alignment.maps import align_grid, align_input, pair_scores
from medsyn.alignment.metrics import report_positives
from medsyn.alignment.run import AlignRun
from medsyn.data.channels import MASK_CHANNELS
from medsyn.data.segment import Segmenter
from medsyn.evaluation.volumes import VolumeRef, load_volume

SCORES = ("global", "fine")
GROUPS = ("samples", "real_matched", "real_mismatched")
BOOTSTRAP_RESAMPLES = 2000
REPORT_BATCH = 32
MISMATCHED_REPORTS = 32  # a real volume is scored with at most this many other reports (drawn, seeded)


def bootstrap_mean(values: Sequence[float | None], seed: int = 0) -> dict[str, float | int | None]:
    """Mean, bootstrap standard error of the mean (`BOOTSTRAP_RESAMPLES` resamples, seeded) and count of
    the finite values; `se` is None for fewer than 2 values, `mean` too for none."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if len(x) < 2:
        return {"mean": float(x.mean()) if len(x) else None, "se": None, "n": int(len(x))}
    result = stats.bootstrap((x,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                             random_state=np.random.default_rng(seed))  # fmt: skip
    return {"mean": float(x.mean()), "se": float(result.standard_error), "n": int(len(x))}


class _Embedder:
    """Volume and report embeddings of one align run, each volume on the run's base grid."""

    def __init__(self, run: AlignRun, backend: Callable[[], Segmenter]) -> None:
        self.run, self.backend, self.segmenter = run, backend, None
        self.hr_grid, self.factor = align_grid(run)

    def volume(self, ref: VolumeRef) -> tuple[torch.Tensor, torch.Tensor]:
        """The volume's global (D,) and patch (P, D) embeddings."""
        volume = load_volume(ref)
        if any(c not in volume.masks for c in MASK_CHANNELS) and self.segmenter is None:
            self.segmenter = self.backend()
        data = align_input(volume.hu, volume.affine, volume.masks, self.hr_grid, self.factor,
                           self.run.patch_size, self.segmenter, ref.source)  # fmt: skip
        global_, patches, _ = self.run.encode_volumes(data.x[None])
        return global_[0].cpu(), patches[0].cpu()

    def reports(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each text's global (D,) and word (W, D) embeddings."""
        out = []
        for start in range(0, len(texts), REPORT_BATCH):
            global_, _, words = self.run.encode_reports(list(texts[start : start + REPORT_BATCH]))
            out += [(g.cpu(), w.cpu()) for g, w in zip(global_, words, strict=True)]
        return out


def _embed_all(
    embedder: _Embedder, refs: Sequence[VolumeRef], role: str, skipped: list[dict], log: Callable[[str], None]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Volume embeddings of the refs with a report; the others are listed in `skipped` with the reason."""
    out = {}
    for ref in refs:
        if not (ref.prompt or "").strip():
            reason = "no prompt in meta.json" if role == "samples" else "no report (findings/impression)"
            skipped.append({"id": ref.id, "source": ref.source, "role": role, "reason": reason})
            continue
        try:
            out[ref.id] = embedder.volume(ref)
        except Exception as err:  # a bad volume is reported and the rest are scored
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            skipped.append({"id": ref.id, "source": ref.source, "role": role, "reason": reason})
            log(f"alignment score: skipped {ref.source}: {reason}")
    return out


def _mean_scores(scores: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    return {
        k: (float(np.mean(v)) if (v := [s[k] for s in scores if s[k] is not None]) else None) for k in SCORES
    }


def alignment_scores(
    run: AlignRun,
    samples: Sequence[VolumeRef],
    real: Sequence[VolumeRef],
    backend: Callable[[], Segmenter],
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> dict[str, Any]:
    """Alignment scores of `samples` with their prompts and of the `real` volumes with their own and
    with the other reports (see the module docstring), for metrics.json's `alignment` section.

    `backend` builds the segmenter for volumes that come without masks (called at most once); `seed`
    draws the mismatched reports of a volume when it has more than `MISMATCHED_REPORTS`, and the
    bootstrap resamples.
    """
    embedder, skipped = _Embedder(run, backend), []
    sample_vectors = _embed_all(embedder, samples, "samples", skipped, log)
    real_vectors = _embed_all(embedder, real, "real", skipped, log)
    prompts = {ref.id: ref.prompt for ref in samples if ref.id in sample_vectors}
    real_texts = {ref.id: ref.prompt for ref in real if ref.id in real_vectors}
    reports = embedder.reports([*prompts.values(), *real_texts.values()])
    sample_reports, real_reports = reports[: len(prompts)], reports[len(prompts) :]
    per_sample = {key: pair_scores(*sample_reports[n], *sample_vectors[key]) for n, key in enumerate(prompts)}
    same = report_positives(list(real_texts.values()))  # (R, R) True where two reports are the same text
    per_real, rng = {}, np.random.default_rng(seed)
    for i, key in enumerate(real_texts):
        candidates = np.flatnonzero(~same[i].numpy())
        if len(candidates) > MISMATCHED_REPORTS:
            candidates = np.sort(rng.choice(candidates, MISMATCHED_REPORTS, replace=False))
        others = [pair_scores(*real_reports[j], *real_vectors[key]) for j in candidates]
        per_real[key] = {
            "matched": pair_scores(*real_reports[i], *real_vectors[key]),
            "mismatched": _mean_scores(others) if others else dict.fromkeys(SCORES),
        }
    groups = {
        "samples": list(per_sample.values()),
        "real_matched": [r["matched"] for r in per_real.values()],
        "real_mismatched": [r["mismatched"] for r in per_real.values()],
    }
    summary = {
        g: {k: bootstrap_mean([s[k] for s in scores], seed) for k in SCORES} for g, scores in groups.items()
    }
    hr_grid, factor = embedder.hr_grid, embedder.factor
    base = hr_grid.coarsen(factor)
    log(f"alignment score: {len(per_sample)} sample(s), {len(per_real)} real volume(s) scored, "
        f"{len(skipped)} skipped")  # fmt: skip
    return {
        "align_run": {"run_dir": str(run.run_dir), "weights": str(run.weights), "sha256": run.sha256},
        "grid": {
            "base_shape": list(base.shape),
            "spacing_mm": list(base.spacing),
            "patch_size": run.patch_size,
            "high_resolution": hr_grid.to_dict(),
            "factor": factor,
        },  # fmt: skip
        "samples": per_sample,
        "real": per_real,
        "summary": summary,
        "skipped": skipped,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "mismatched_reports_per_volume": MISMATCHED_REPORTS,
    }
