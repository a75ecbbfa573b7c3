"""Tiny radiographs, an untrained tiny VQ-GAN run and a tiny 2D alignment codebook for the language-model
tests (tests/test_cxr_lm.py, tests/test_cxr_sample.py); no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from training_fixtures import REPORTS, align_overrides, make_text_model

from medsyn.radiograph.cache import write_radiograph, write_radiograph_manifest

SIZE, PATCH = 32, 8  # 32^2 radiographs; 8^2-pixel alignment patches (4 x 4 grid)
DOWNSAMPLE, CODES = 4, 32  # the VQ-GAN (vqgan-tiny): 8 x 8 tokens per image, 2 x 2 per keypatch


def make_vqgan(run_dir: Path, seed: int = 0) -> Path:
    """A `train.py vqgan` run directory holding an untrained `vqgan-tiny` (32^2 images, 8 x 8 tokens of 32
    codes, downsampling 4): what `load_vqgan` reads, without the training."""
    from medsyn.radiograph.vqgan import build_vqgan
    from medsyn.weights import export_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_vqgan({"preset": "vqgan-tiny"})
    config = {"stage": "vqgan", "model": {"preset": "vqgan-tiny"}}
    export_weights(run_dir / "model.safetensors", model.net.state_dict(), config)
    return run_dir


def make_radiographs(root: Path, n: int = 12, seed: int = 0) -> Path:
    """A radiograph cache of `n` toy films (half train, a quarter val, a quarter test): a dark chest with a
    bright blob on the side its report names."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    for i in range(n):
        findings, impression = REPORTS[i % len(REPORTS)]
        cx = (0.5 if "right" in findings.lower() else -0.5) + rng.normal(0, 0.05)
        image = np.where((x / 0.9) ** 2 + (y / 0.8) ** 2 < 1, -0.6, -1.0)
        image = image + 1.4 * np.exp(-((x - cx) ** 2 + (y - 0.3 * (i % 3 - 1)) ** 2) / 0.05)
        image = np.clip(image + rng.normal(0, 0.02, image.shape), -1, 1)
        meta = {"findings": findings, "impression": impression, "kind": "drr", "source": "synthetic"}
        write_radiograph(root, f"cxr_{i:03d}", image.astype(np.float32), meta)
    write_radiograph_manifest(root, fractions=(0.5, 0.25, 0.25))
    return root


def make_codebook(base: Path, cache: Path) -> tuple[Path, Path]:
    """A 2-step 2D align run on `cache` and the codebook of its training subjects: (run dir, codebook dir)."""
    from medsyn.alignment import Codebook, load_align_run
    from medsyn.training.align import train_align
    from medsyn.training.config import load_run_config

    bert = make_text_model(base / "bert")
    extra = {"model.spatial_dims": 2, "model.in_channels": 1, "model.patch_size": PATCH}
    run_dir = train_align(
        load_run_config("align", None, align_overrides(cache, bert, base / "align", **extra))
    )
    codebook = Codebook.build(load_align_run(run_dir), cache, k1=6, k2=24, batch_size=4, progress=False)
    return run_dir, codebook.save(base / "codebook")


def cxr_overrides(cache: Path, vqgan: Path, run_dir: Path, keypatches: tuple[Path, Path] | None = None,
                  **extra) -> list[str]:  # fmt: skip
    """Dotted overrides for a 2-step `train.py cxr` run of a tiny GPT-2 on CPU."""
    args = {
        "run_dir": run_dir, "vqgan": vqgan, "data.root": cache, "data.num_workers": 0, "data.batch_size": 4,
        "effective_batch_size": 4, "model.config.n_layer": 2, "model.config.n_head": 2, "model.config.n_embd": 32,
        "model.config.n_positions": 256, "model.tokenizer_vocab_size": 200, "sequence.max_report_tokens": 32,
        "sequence.ucg_rate": 0.25, "optim.lr": 1.0e-3, "optim.warmup_steps": 0, "trainer.max_steps": 2,
        "trainer.accelerator": "cpu", "trainer.precision": "32", "trainer.val_check_interval": 2,
        "trainer.log_every_n_steps": 1, "trainer.enable_model_summary": False, "trainer.enable_progress_bar": False,
        "trainer.limit_val_batches": 1, "checkpoint.every_n_steps": 2, "logger.kind": "csv",
    }  # fmt: skip
    if keypatches is not None:
        args["keypatches"] = (
            f"{{align: {keypatches[0]}, codebook: {keypatches[1]}, k3: 2, max_keypatches: 3}}"
        )
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]
