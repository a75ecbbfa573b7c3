"""Tiny data and a tiny BERT for the training and sampling tests (built in a temp dir, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsyn.data.cache import downsample, write_manifest, write_subject
from medsyn.data.channels import encode_volume

REPORTS = [
    ("Large right pleural effusion. The heart is enlarged.", "Right effusion. Cardiomegaly."),
    ("No pleural effusion. Heart size is normal. Lungs are clear.", "No acute abnormality."),
    ("Emphysema in the left upper lobe. No effusion.", "Emphysema."),
    ("A 12 mm nodule in the right lower lobe. No consolidation.", "Pulmonary nodule."),
]


def make_cache(root: Path, n: int = 8, size: int = 32, factor: int = 4, seed: int = 0) -> Path:
    """A prepared cache of `n` toy chests (two ellipsoid lungs, lobes split, a tube airway)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    for i in range(n):
        x, y, z = grid + rng.normal(0, 0.03, (3, 1, 1, 1))
        body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
        # RAS+: +x is the patient's right, so the left lung lies at x < 0
        left = ((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.8) ** 2 < 1
        right = ((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.8) ** 2 < 1
        ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, body.shape)
        ct[left | right] = -850
        lobes = np.zeros(body.shape, np.uint8)
        lobes[left] = np.where(z[left] > 0, 1, 2)
        lobes[right] = np.where(z[right] > 0.3, 3, np.where(z[right] > -0.2, 4, 5))
        airway = ((x**2 + y**2) < 0.01) & (z > 0.2)
        vessels = (left | right) & (rng.random(body.shape) < 0.02)
        hr = encode_volume({"ct": ct, "lobes": lobes, "airway": airway, "vessels": vessels})
        findings, impression = REPORTS[i % len(REPORTS)]
        meta = {"findings": findings, "impression": impression, "size": size, "lr_size": size // factor,
                "spacing_mm": 256.0 / size, "source": "synthetic"}  # fmt: skip
        write_subject(root, f"toy_{i:03d}", hr, downsample(hr, factor), meta)
    write_manifest(root, fractions=(0.75, 0.25, 0.0))
    return root


def make_text_model(root: Path, hidden_size: int = 32) -> Path:
    from medsyn.conditioning import build_tiny_bert

    texts = [f"FINDINGS: {f} IMPRESSION: {i}" for f, i in REPORTS] * 4
    return build_tiny_bert(root, texts, hidden_size=hidden_size, num_layers=1, num_heads=2, vocab_size=200)


def align_overrides(cache: Path, bert: Path, run_dir: Path, **extra) -> list[str]:
    """Dotted overrides for a 2-step `train.py align` run on a `make_cache` cache (8^3 base grid, 4^3-voxel
    patches, 16-dim embeddings, CPU)."""
    args = {
        "run_dir": run_dir, "model.preset": "align-tiny", "text.model": bert, "text.max_length": 64,
        "projection.dim": 16, "data.root": cache, "data.num_workers": 0, "data.batch_size": 4,
        "effective_batch_size": 4, "optim.warmup_steps": 0, "trainer.max_steps": 2, "trainer.accelerator": "cpu",
        "trainer.precision": "32", "trainer.val_check_interval": 2, "trainer.log_every_n_steps": 1,
        "trainer.enable_model_summary": False, "trainer.enable_progress_bar": False, "checkpoint.every_n_steps": 2,
        "logger.kind": "csv",
    }  # fmt: skip
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]
