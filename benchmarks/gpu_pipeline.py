"""The paper-scale pipeline on one GPU, a few steps of each stage, through the user's own commands.

16 phantoms at 256^3 (1 mm) -> prepared cache -> `train.py base` (configs/base.yaml: base-700m, batch 4 x
64^3, checkpointing, bf16-mixed, EMA) and `train.py sr` (configs/sr.yaml: sr-light, batch 2 x 96^3 crops)
on one GPU -> `sample.py` with full-volume and windowed SR at 256^3. The text encoder is a randomly
initialised BERT-base-shaped model (12 x 768) built locally, since the machine has no hub access; the
numbers do not depend on weights. Reported from each run's metrics.csv: the allocator's peak on the GPU
(`train/gpu_peak_gib`: the step plus the EMA copy, the frozen text encoder and Lightning's own), median
seconds per micro-batch after the first 5 steps; and each sample.py call's wall time (loading included).

    python benchmarks/gpu_pipeline.py [--work DIR] [--steps 30] [--phantoms 16]
    python benchmarks/gpu_pipeline.py --tiny   # the same commands with tiny presets on a CPU (a smoke run)

Compare with `benchmarks/memory_estimate.py` (per-GPU column, less DDP's buckets on one GPU) and
`benchmarks/gpu.py` (the bare step). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = [
    "Large right pleural effusion with adjacent compressive atelectasis. The heart is enlarged.",
    "The lungs are clear. No pleural effusion. Heart size is normal.",
]


def run(cmd: list[str], log: Path) -> float:
    """Run a command from the repository root, its output to `log`; seconds, or exit on failure."""
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code:
        print(log.read_text()[-3000:])
        sys.exit(f"gpu_pipeline: {' '.join(cmd[:3])} failed (exit {code}); log {log}")
    return seconds


def metrics(run_dir: Path) -> dict[str, float]:
    """Peak GPU memory and the median seconds per micro-batch (after 5 steps) logged by the run."""
    rows = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    peaks = [float(r["train/gpu_peak_gib"]) for r in rows if r.get("train/gpu_peak_gib")]
    secs = [(int(r["step"]), float(r["train/sec_per_batch"])) for r in rows if r.get("train/sec_per_batch")]
    later = [s for step, s in secs if step >= 5] or [s for _, s in secs]
    return {
        "gpu_peak_gib": max(peaks) if peaks else float("nan"),
        "sec_per_micro_batch": statistics.median(later) if later else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medsyn_gpu_pipeline"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stage")
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tiny", action="store_true", help="tiny presets at 64^3 on the CPU (smoke run)")
    args = parser.parse_args(argv)
    size, device = (64, "cpu") if args.tiny else (256, "cuda")
    width = 32 if args.tiny else 768
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    py = sys.executable

    bert = work / "bert-base-random"
    if not bert.exists():
        from medsyn.conditioning.tiny_bert import build_tiny_bert

        build_tiny_bert(
            bert, REPORTS, hidden_size=width, num_layers=2 if args.tiny else 12, num_heads=2 if args.tiny else 12,
            intermediate_size=4 * width, vocab_size=200, max_position_embeddings=512,
        )  # fmt: skip
    common = [
        f"data.root={work / 'cache'}",
        f"data.phantoms={{n: {args.phantoms}, size: {size}, workers: {args.workers}, out: {work / 'phantoms'}}}",
        "data.num_workers=4",
        "trainer.devices=1",
        "trainer.strategy=auto",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        "logger.kind=csv",
        "checkpoint.every_n_steps=1000",
        "preview.every_n_steps=0",
        *(["trainer.accelerator=cpu", "data.num_workers=0"] if args.tiny else []),
    ]
    out: dict = {}
    stages = {
        "base": ["configs/base.yaml", f"text.model={bert}", "effective_batch_size=8"],
        "sr": ["configs/sr.yaml", "effective_batch_size=4"],
    }
    if args.tiny:
        stages["base"] += ["model.preset=base-tiny", "model.cross_attention_dim=32"]
        stages["sr"] += ["model.preset=sr-tiny", "data.crop_size=32"]
    for stage, (config, *extra) in stages.items():
        run_dir = work / "runs" / stage
        seconds = run(
            [py, "train.py", stage, "--config", config, f"run_dir={run_dir}", *common, *extra],
            work / f"train_{stage}.log",
        )  # fmt: skip
        out[stage] = {**metrics(run_dir), "wall_sec": seconds}
        print(
            f"train {stage}: GPU peak {out[stage]['gpu_peak_gib']:.2f} GiB, "
            f"{out[stage]['sec_per_micro_batch']:.3f} s per micro-batch, {seconds:.0f} s in all "
            f"(phantoms and cache included for base)",
            flush=True,
        )
    for mode in ("full", "window"):
        seconds = run(
            [py, "sample.py", "--base", str(work / "runs/base"), "--sr", str(work / "runs/sr"),
             "--prompt", REPORTS[0], "--out", str(work / f"samples_{mode}"), "--overwrite",
             "--device", device, "--precision", "bf16", "--sr-mode", mode, "--window", str(size // 2 + 16)],
            work / f"sample_{mode}.log",
        )  # fmt: skip
        written = sorted(p.name for p in (work / f"samples_{mode}" / "0").iterdir())
        out[f"sample_{mode}"] = {"wall_sec": seconds, "files": written}
        print(f"sample.py --sr-mode {mode}: {seconds:.1f} s (process start and loading included): {written}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
