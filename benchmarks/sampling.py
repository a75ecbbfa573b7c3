"""Sampling quality, cost and memory: samplers x step counts, FLOPs of a 256^3 sample, SR peak memory,
and the base model as a segmenter (the CT held fixed, paper Table V).

    python benchmarks/sampling.py flops   [--steps 25 --sr-steps 10 --guidance 3]
    python benchmarks/sampling.py memory  --size 128 [--window 64] [--preset sr-light]
    python benchmarks/sampling.py compare --base RUN [--sr RUN] --cache DIR [--num-samples 4]
    python benchmarks/sampling.py segment --base RUN [--sr RUN] --cache DIR [--num-subjects 4]

compare: per sampler and step count, the distance of sample statistics (lung volume fraction,
%LAA-950 in the lungs, fraction of lobe voxels with lung HU) to the same statistics of the cache,
and the fewest steps whose distance is no worse than 250-step ancestral sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsyn.data.channels import decode_volume  # noqa: E402

MEDSYN_PFLOP = 2.24  # MedSyn's released defaults: 50 base steps with guidance + 20 SR steps at 256^3
PAPER_DICE = {"lobes": 0.77, "airway": 0.75}
STATS = ("lung_fraction", "laa950", "lobe_lung_hu")
# a difference below these is noise whatever the data's spread (fractions; %LAA in percent points)
FLOORS = {"lung_fraction": 0.01, "laa950": 1.0, "lobe_lung_hu": 0.01}


# ---- cost ------------------------------------------------------------------------------------------
def n_windows(size: int, window: int, overlap: float) -> int:
    """Windows per axis that MONAI's sliding_window_inference visits (the last one aligned to the end)."""
    if window >= size:
        return 1
    interval = max(int(window * (1 - overlap)), 1)
    return math.ceil((size - window) / interval) + 1


def sample_flops(steps: int, sr_steps: int, guidance: float, window: int | None = None, overlap: float = 0.2,
                 base_size: int = 64, sr_size: int = 256) -> dict[str, float]:  # fmt: skip
    """FLOPs of one sample with the paper-scale presets (counted on the meta device)."""
    import medsyn
    from medsyn.nn.inspect import profile_model

    base = profile_model(medsyn.build_model("base-700m", device="meta"), base_size).flops
    passes = 1 if guidance == 1.0 else 2
    if window is None or window >= sr_size:
        sr = profile_model(medsyn.build_model("sr-light", device="meta"), sr_size).flops
    else:
        per = profile_model(medsyn.build_model("sr-light", device="meta"), window).flops
        sr = per * n_windows(sr_size, window, overlap) ** 3
    out = {"base_forward": base, "sr_forward": sr, "base": passes * steps * base, "sr": sr_steps * sr}
    out["total"] = out["base"] + out["sr"]
    return out


def cmd_flops(args: argparse.Namespace) -> dict:
    report = {}
    for name, window in (("full", None), ("window", args.window)):
        f = sample_flops(args.steps, args.sr_steps, args.guidance, window, args.overlap)
        report[name] = f["total"] / 1e15
        print(f"{name:6s}: base {args.steps} steps x {1 if args.guidance == 1 else 2} passes "
              f"{f['base'] / 1e15:.3f} PFLOP + SR {args.sr_steps} steps {f['sr'] / 1e15:.3f} PFLOP = "
              f"{f['total'] / 1e15:.3f} PFLOP; MedSyn's defaults {MEDSYN_PFLOP} PFLOP = "
              f"{MEDSYN_PFLOP / (f['total'] / 1e15):.1f}x more")  # fmt: skip
    return report


# ---- memory ----------------------------------------------------------------------------------------
def _memory_child(args: argparse.Namespace) -> None:
    """One SR step at `size`^3 with a random `preset` model; prints peak RSS (GB) and seconds as JSON."""
    from medsyn.generation.model import build_diffusion_model
    from medsyn.generation.stages import generate_sr

    model = build_diffusion_model({"model": {"preset": args.preset}, "lowres": {}}).eval()
    lowres = torch.zeros(1, 4, *(args.size,) * 3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    generate_sr(model, lowres, [0], steps=args.sr_steps, window=args.window, overlap=args.overlap)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_gb": peak, "before_gb": before, "seconds": time.perf_counter() - start}))


def cmd_memory(args: argparse.Namespace) -> dict:
    report = {}
    for mode, window in (("full", None), ("window", args.window)):
        cmd = [sys.executable, __file__, "memory", "--child", "--size", str(args.size), "--preset", args.preset,
               "--sr-steps", str(args.sr_steps), "--overlap", str(args.overlap)]  # fmt: skip
        cmd += ["--window", str(window)] if window else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        report[mode] = json.loads(out)
        print(f"SR {mode:6s} {args.preset} {args.size}^3 {f'window {window} overlap {args.overlap} ' if window else ''}"
              f"{args.sr_steps} step(s): peak RSS {report[mode]['peak_gb']:.2f} GB "
              f"({report[mode]['before_gb']:.2f} GB before sampling), {report[mode]['seconds']:.0f} s")  # fmt: skip
    return report


# ---- quality ---------------------------------------------------------------------------------------
def statistics(ct: np.ndarray, lobes: np.ndarray) -> dict[str, float]:
    """Lung volume fraction, %LAA-950 within the lungs, fraction of lobe voxels with lung HU (< -500)."""
    lung = lobes > 0
    n = max(int(lung.sum()), 1)
    return {
        "lung_fraction": float(lung.mean()),
        "laa950": float(100.0 * (ct[lung] < -950).sum() / n),
        "lobe_lung_hu": float((ct[lung] < -500).sum() / n),
    }


def data_statistics(cache: Path, key: str, limit: int = 64) -> dict[str, tuple[float, float]]:
    """Mean and std of each statistic over the cache's volumes (`key` "lr" or "hr")."""
    from medsyn.data.cache import load_array, read_cache_manifest

    rows = [statistics(**decode_pair(load_array(r[key]))) for r in read_cache_manifest(cache)[:limit]]
    return {
        k: (float(np.mean([r[k] for r in rows])), max(float(np.std([r[k] for r in rows])), FLOORS[k]))
        for k in STATS
    }


def decode_pair(x: np.ndarray) -> dict[str, np.ndarray]:
    out = decode_volume(np.asarray(x, np.float32))
    return {"ct": out["ct"], "lobes": out["lobes"]}


def distance(samples: list[dict[str, float]], data: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Mean over statistics of |sample mean - data mean| / max(data std, floor), and its standard error
    from the spread of the samples (the noise of a few samples: differences below it do not count)."""
    d = [abs(np.mean([s[k] for s in samples]) - data[k][0]) / data[k][1] for k in STATS]
    se = [np.std([s[k] for s in samples]) / math.sqrt(len(samples)) / data[k][1] for k in STATS]
    return float(np.mean(d)), float(np.mean(se))


def cmd_compare(args: argparse.Namespace) -> dict:
    from medsyn.data.cache import read_cache_manifest
    from medsyn.data.datamodule import report_text
    from medsyn.generation.run import load_run
    from medsyn.generation.stages import SampleOptions, synthesize

    base = load_run(args.base, stage="base")
    sr = load_run(args.sr, stage="sr") if args.sr else None
    data = data_statistics(Path(args.cache), "hr" if sr else "lr")
    rows = read_cache_manifest(args.cache)
    prompts = [report_text(rows[i % len(rows)]) for i in range(args.num_samples)]
    seeds = list(range(args.num_samples))
    results: dict[str, dict[int, float]] = {}
    errors: dict[str, dict[int, float]] = {}
    for sampler in args.samplers:
        for steps in args.steps:
            start = time.perf_counter()
            opts = SampleOptions(steps=steps, sr_steps=args.sr_steps, sampler=sampler, guidance=args.guidance,
                                 batch_size=args.batch_size)  # fmt: skip
            stats = []
            for i in range(0, len(seeds), args.batch_size):
                x = synthesize(
                    base, sr, prompts[i : i + args.batch_size], seeds[i : i + args.batch_size], opts
                )
                stats += [statistics(**decode_pair(v.numpy())) for v in x]
            d, se = distance(stats, data)
            results.setdefault(sampler, {})[steps], errors.setdefault(sampler, {})[steps] = d, se
            print(f"{sampler:10s} {steps:4d} steps: distance {d:.3f} +- {se:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    reference = results.get("ancestral", {}).get(max(args.steps))
    best = {}
    if reference is not None:
        for sampler, by_steps in results.items():
            slack = max(args.tolerance, errors["ancestral"][max(args.steps)])
            ok = [s for s, d in sorted(by_steps.items()) if d <= reference + slack]
            best[sampler] = ok[0] if ok else None
            print(f"{sampler}: fewest steps matching {max(args.steps)}-step ancestral "
                  f"(distance {reference:.3f} + {slack:.3f}): {best[sampler]}")  # fmt: skip
    return {"distance": results, "stderr": errors, "reference": reference, "fewest_steps": best, "data": data}


def cmd_segment(args: argparse.Namespace) -> dict:
    """Dice of lobes (mean over labels 1..5) and airway sampled with the CT of held-out subjects fixed."""
    from medsyn.data.cache import load_array, read_cache_manifest
    from medsyn.data.segment import dice
    from medsyn.generation.run import load_run
    from medsyn.generation.segment import segment_with_model

    base = load_run(args.base, stage="base")
    sr = load_run(args.sr, stage="sr") if args.sr else None
    rows = read_cache_manifest(args.cache)
    held = [r for r in rows if r["split"] in ("test", "val")] or rows
    scores: dict[str, list[float]] = {"lobes": [], "airway": []}
    for r in held[: args.num_subjects]:
        truth = decode_volume(np.asarray(load_array(r["hr" if sr else "lr"]), np.float32))
        pred = segment_with_model(base, truth["ct"], sr, steps=args.steps, sr_steps=args.steps,
                                  sampler=args.sampler, resample_rounds=args.resample_rounds)  # fmt: skip
        scores["lobes"].append(np.mean([dice(pred["lobes"] == k, truth["lobes"] == k) for k in range(1, 6)]))
        scores["airway"].append(dice(pred["airway"] > 0, truth["airway"] > 0))
    report = {k: float(np.mean(v)) for k, v in scores.items()}
    for k, v in report.items():
        print(
            f"segmentation Dice {k}: {v:.3f} on {len(scores[k])} held-out subject(s) (paper: {PAPER_DICE[k]})"
        )
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flops", help="FLOPs of one 256^3 sample at paper scale")
    m = sub.add_parser("memory", help="peak RSS of full-volume vs sliding-window SR")
    m.add_argument("--size", type=int, default=128)
    m.add_argument("--preset", default="sr-light")
    m.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    c = sub.add_parser("compare", help="samplers x steps against the data's statistics")
    s = sub.add_parser("segment", help="Dice of the model as a segmenter (CT fixed)")
    for q in (f, m):
        q.add_argument("--steps", type=int, default=25)
        q.add_argument("--sr-steps", type=int, default=10 if q is f else 1)
        q.add_argument("--guidance", type=float, default=3.0)
        q.add_argument("--window", type=int, default=144 if q is f else 64)
        q.add_argument("--overlap", type=float, default=0.2)
    for q in (c, s):
        q.add_argument("--base", required=True)
        q.add_argument("--sr")
        q.add_argument("--cache", required=True)
        q.add_argument("--json", help="also write the report here")
    c.add_argument("--samplers", nargs="+", default=["ancestral", "ddim", "dpmpp-2m"])
    c.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 250])
    c.add_argument("--num-samples", type=int, default=4)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--guidance", type=float, default=3.0)
    c.add_argument(
        "--sr-steps", type=int, default=10, help="SR steps (the samplers are compared on the base)"
    )
    c.add_argument("--tolerance", type=float, default=0.05, help="slack in data-std units when matching")
    s.add_argument("--num-subjects", type=int, default=4)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--sampler", default="dpmpp-2m")
    s.add_argument("--resample-rounds", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "memory" and args.child:
        _memory_child(args)
        return {}
    report = {"flops": cmd_flops, "memory": cmd_memory, "compare": cmd_compare, "segment": cmd_segment}[
        args.command
    ](args)
    if args.command == "compare":
        report["pflop"] = cmd_flops(build_parser().parse_args(["flops", "--guidance", str(args.guidance)]))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
