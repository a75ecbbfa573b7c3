"""Sampling quality, cost and memory: samplers x step counts, FLOPs of a 256^3 sample, SR peak memory,
and the base model as a segmenter (the CT held fixed, paper Table V).

    python benchmarks/sampling.py flops   [--steps 25 --sr-steps 10 --guidance 3]
    python benchmarks/sampling.py memory  [--size 256 --window 144 --sr-steps 2] [--preset sr-light]
    python benchmarks/sampling.py sweep   --base cosine=runs/phantom/base --base rf=runs/phantom/base_rf \
                                          --cache data/phantom/cache [--sr runs/demo/sr --sr-cache data/demo/cache]
    python benchmarks/sampling.py segment --base RUN [--sr RUN] --cache DIR [--num-subjects 4]

sweep: for each base run (its schedule: cosine or rectified flow) x sampler x steps, sample the held-out
(test split) reports and measure them as `medsyn evaluate` does (the same measures, segmentation backend
and Wasserstein-1 distance to the held-out volumes on the base grid), with bootstrap standard errors; a
setting matches the run's reference (`--reference` steps) when no measure is farther from the data than
the reference's beyond their combined standard error. Controllability p-values (`medsyn
controllability`'s tests) for the reference and the cheapest matching setting. With --sr, the SR steps
the same way on the SR cache's held-out volumes (upsampled from their own base-grid arrays). Ends with
the PFLOP of one 256^3 sample at paper scale for the chosen settings, as a JSON line.
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
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsyn.data.channels import decode_volume  # noqa: E402

MEDSYN_PFLOP = 2.24  # MedSyn's released defaults: 50 base steps with guidance + 20 SR steps at 256^3
PAPER_DICE = {"lobes": 0.77, "airway": 0.75}


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
SR_MEMORY_TARGET = 1 / 3  # issue 14: windowed SR at 256^3 peaks at most a third of the full-volume SR


def _memory_child(args: argparse.Namespace) -> None:
    """One SR sampling run (`sr_steps` steps) at `size`^3 with a random `preset` model, on the full volume
    (`--child full`) or by windows; prints peak RSS (GiB), the RSS before sampling and seconds as JSON."""
    from medsyn.generation.model import build_diffusion_model
    from medsyn.generation.stages import generate_sr

    model = build_diffusion_model({"model": {"preset": args.preset}, "lowres": {}}).eval()
    lowres = torch.zeros(1, 4, *(args.size,) * 3)
    window = args.window if args.child == "windowed" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    generate_sr(model, lowres, [0], steps=args.sr_steps, window=window, overlap=args.overlap)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_gb": peak, "before_gb": before, "seconds": time.perf_counter() - start}))


def cmd_memory(args: argparse.Namespace) -> dict:
    """Peak RSS of SR sampling on the full volume and by windows, each in a fresh process, and their ratio
    against `SR_MEMORY_TARGET`."""
    report: dict[str, Any] = {"benchmark": "sr_memory", "preset": args.preset, "size": args.size,
                              "window_size": args.window, "overlap": args.overlap, "sr_steps": args.sr_steps}  # fmt: skip
    places = {"full": "the full volume", "windowed": f"windows of {args.window}^3 (overlap {args.overlap})"}
    for mode, place in places.items():
        cmd = [sys.executable, __file__, "memory", "--child", mode, "--size", str(args.size), "--preset",
               args.preset, "--sr-steps", str(args.sr_steps), "--window", str(args.window), "--overlap",
               str(args.overlap)]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:  # e.g. killed for memory (-9): say so in one line
            last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
            raise SystemExit(f"memory: the {mode} SR child failed ({last}); command: {' '.join(cmd)}")
        report[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"SR {mode:8s} {args.preset} {args.size}^3 on {place}, {args.sr_steps} step(s): peak RSS "
              f"{report[mode]['peak_gb']:.2f} GiB ({report[mode]['before_gb']:.2f} GiB before sampling), "
              f"{report[mode]['seconds']:.0f} s", flush=True)  # fmt: skip
    report["ratio"] = report["windowed"]["peak_gb"] / report["full"]["peak_gb"]
    report["target"] = SR_MEMORY_TARGET
    report["meets_target"] = report["ratio"] <= SR_MEMORY_TARGET
    print(f"windowed / full peak RSS: {report['windowed']['peak_gb']:.2f} / {report['full']['peak_gb']:.2f} GiB = "
          f"{report['ratio']:.3f}: {'meets' if report['meets_target'] else 'misses'} the target <= 1/3")  # fmt: skip
    print(json.dumps(report))
    return report


# ---- quality: schedule x sampler x steps, judged by medsyn evaluate's measures ------------------------
def _real_measures(cache: Path, split: str, grid: str, out: Path, backend: str) -> dict[str, dict]:
    """measure_volume of the cache's `split` volumes on `grid`, as `medsyn evaluate --cache-grid` reads
    them; computed once and kept in `out` (JSON) for the next run."""
    from medsyn.data.segment import get_backend
    from medsyn.evaluation.measures import measure_volume
    from medsyn.evaluation.volumes import find_volumes, load_volume

    if out.is_file():
        stored = json.loads(out.read_text())
        if stored.get("key") == [str(cache), split, grid, backend]:
            return stored["measures"]
    segmenter, measures = get_backend(backend), {}
    for ref in tqdm(find_volumes(cache, split, grid), desc=f"measuring {split} {grid}", unit="volume"):
        volume = load_volume(ref)
        measures[ref.id] = measure_volume(volume.hu, volume.affine, volume.masks or None, segmenter)
    measures = json.loads(json.dumps(measures, default=str))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"key": [str(cache), split, grid, backend], "measures": measures}))
    return measures


def _distances(samples: dict[str, dict], real: dict[str, dict], boots: int = 200) -> dict[str, dict]:
    """Per measure: the Wasserstein-1 distance of the samples' values to the real ones (as `medsyn evaluate`
    reports it) and its standard error, bootstrapped over the samples."""
    from medsyn.evaluation.evaluate import wasserstein

    rng = np.random.default_rng(0)
    keys = list(samples)
    point = wasserstein(samples, real)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(boots):
        pick = {f"{i}": samples[keys[j]] for i, j in enumerate(rng.integers(0, len(keys), len(keys)))}
        for k, v in wasserstein(pick, real).items():
            draws[k].append(v)
    return {k: {"w": v, "se": float(np.std(draws[k]))} for k, v in point.items()}


def _spread_measures(real: dict[str, dict]) -> list[str]:
    """The measures that vary across the real volumes (a constant one cannot tell samplers apart)."""
    from medsyn.evaluation.evaluate import _scalar
    from medsyn.evaluation.measures import MEASURES

    keep = []
    for key in MEASURES:
        values = [v for v in (_scalar(m, key) for m in real.values()) if v is not None]
        if len(values) >= 2 and np.std(values) > 0:
            keep.append(key)
    return keep


def _matches(row: dict, ref: dict, keys: list[str]) -> list[str]:
    """The measures on which `row` is farther from the real data than the reference beyond their combined
    standard error (empty: the row matches the reference)."""
    worse = []
    for k in keys:
        a, b = row["distances"].get(k), ref["distances"].get(k)
        if a is None or b is None:
            continue
        if a["w"] - b["w"] > math.hypot(a["se"], b["se"]):
            worse.append(k)
    return worse


def _sample_and_measure(base, requests, options, folder: Path, backend: str) -> dict[str, dict]:
    from medsyn.data.segment import get_backend
    from medsyn.evaluation.controllability import measure_sample
    from medsyn.generation.output import run_sampling

    run_sampling(base, None, requests, options, folder, overwrite=True, log=lambda s: None)
    segmenter = get_backend(backend)
    return {
        str(i): measure_sample(folder / str(i), folder / f"measures_{i}.json", backend, segmenter)
        for i in range(len(requests))
    }


def cmd_sweep(args: argparse.Namespace) -> dict:
    """Every (run, sampler, steps) samples the held-out reports; distances to the held-out volumes per
    measure against the run's reference (`--reference` steps); controllability p-values for the reference
    and the cheapest matching setting; the fewest network evaluations that match, and its PFLOP."""
    from medsyn.data.cache import read_cache_manifest
    from medsyn.data.datamodule import report_text
    from medsyn.diffusion import network_evaluations
    from medsyn.evaluation.controllability import DEFAULT_PAIRS, run_controllability
    from medsyn.generation.run import load_run
    from medsyn.generation.stages import SampleOptions

    out = Path(args.out)
    if not args.base:
        return {"measures": [], "runs": {}}
    if not args.cache:
        raise SystemExit("sweep: --base needs --cache (the prepared cache the base runs learned from)")
    rows = [r for r in read_cache_manifest(args.cache) if r["split"] == args.split]
    if not rows:
        raise SystemExit(f"{args.cache}: no {args.split} split in manifest.csv; expected held-out rows")
    requests = [(report_text(rows[i % len(rows)]), 10_000 + i) for i in range(args.num_samples)]
    real = _real_measures(Path(args.cache), args.split, "lr", out / "real_measures.json", args.backend)
    keys = _spread_measures(real)
    pairs = [p for p in DEFAULT_PAIRS if p.name in args.pairs]
    report: dict[str, Any] = {"measures": keys, "runs": {}}
    for spec in args.base:
        label, _, path = spec.partition("=")
        base = load_run(path, stage="base")
        schedule = base.model.denoiser.schedule.name
        settings = [(args.reference_sampler.get(schedule, "dpmpp-2m"), args.reference)]
        settings += [(s, n) for s in args.samplers for n in args.steps]
        rows_out = []
        for sampler, steps in settings:
            opts = SampleOptions(steps=steps, sampler=sampler, guidance=args.guidance, batch_size=args.batch_size,
                                 precision=args.precision)  # fmt: skip
            start = time.perf_counter()
            folder = out / label / f"{sampler}-{steps}"
            measures = _sample_and_measure(base, requests, opts, folder / "heldout", args.backend)
            row = {"sampler": sampler, "steps": steps, "nfe": network_evaluations(sampler, steps),
                   "seconds": time.perf_counter() - start,
                   "distances": {k: v for k, v in _distances(measures, real).items() if k in keys}}  # fmt: skip
            rows_out.append(row)
            ref = rows_out[0]
            row["worse_than_reference"] = _matches(row, ref, keys) if row is not ref else []
            print(f"{label:8s} {schedule:15s} {sampler:9s} {steps:4d} steps {row['nfe']:4d} NFE "
                  f"{row['seconds']:6.0f} s  mean W/ref {_mean_ratio(row, ref, keys):.2f}  "
                  f"worse: {', '.join(row['worse_than_reference']) or '-'}", flush=True)  # fmt: skip
        candidates = [r for r in rows_out[1:] if not r["worse_than_reference"]]
        best = min(candidates, key=lambda r: (r["nfe"], _mean_ratio(r, rows_out[0], keys)), default=None)
        baseline = rows_out[0]  # p-values of the reference, or of the setting --pairs-baseline names
        if args.pairs_baseline:
            name, _, steps = args.pairs_baseline.partition(":")
            baseline = {"sampler": name, "steps": int(steps), "nfe": network_evaluations(name, int(steps))}
        for row in [baseline, best] if pairs else []:
            if row is None:
                continue
            opts = SampleOptions(steps=row["steps"], sampler=row["sampler"], guidance=args.guidance,
                                 batch_size=args.batch_size, precision=args.precision)  # fmt: skip
            result = run_controllability(base, None, pairs, args.pair_n, 0, opts,
                                         out / label / f"{row['sampler']}-{row['steps']}" / "controllability",
                                         backend=args.backend, overwrite=True, log=lambda s: None)  # fmt: skip
            row["controllability"] = {f"{p['name']}/{m['measure']}": {"p": m["p"], "p_paired": m["p_paired"],
                                      "in_direction": m["in_direction"]}
                                      for p in result["pairs"] for m in p["measures"]}  # fmt: skip
        if baseline is not rows_out[0] and pairs:
            rows_out.append({**baseline, "distances": {}, "worse_than_reference": ["(not measured)"]})
        report["runs"][label] = {"run": path, "schedule": schedule, "rows": rows_out,
                                 "best": None if best is None else {k: best[k] for k in ("sampler", "steps", "nfe")}}  # fmt: skip
    return report


def _mean_ratio(row: dict, ref: dict, keys: list[str]) -> float:
    """Mean over measures of the row's distance over the reference's (1: as close to the data)."""
    ratios = [row["distances"][k]["w"] / ref["distances"][k]["w"] for k in keys
              if k in row["distances"] and k in ref["distances"] and ref["distances"][k]["w"] > 0]  # fmt: skip
    return float(np.mean(ratios)) if ratios else float("nan")


def cmd_sweep_sr(args: argparse.Namespace, report: dict) -> None:
    """SR steps: the SR run upsamples the held-out volumes' own base-grid arrays (so the base model plays
    no part), measured on the high-resolution grid against the held-out volumes themselves."""
    from medsyn.data.cache import load_array, read_cache_manifest
    from medsyn.data.segment import get_backend
    from medsyn.diffusion import network_evaluations
    from medsyn.evaluation.measures import measure_volume
    from medsyn.generation.run import load_run
    from medsyn.generation.stages import SR_SEED_OFFSET, autocast, generate_sr

    out = Path(args.out)
    sr = load_run(args.sr, stage="sr")
    rows = [r for r in read_cache_manifest(args.sr_cache) if r["split"] == args.split][: args.sr_samples]
    if not rows:
        raise SystemExit(f"{args.sr_cache}: no {args.split} split in manifest.csv; expected held-out rows")
    real = _real_measures(Path(args.sr_cache), args.split, "hr", out / "real_measures_sr.json", args.backend)
    real = {k: v for k, v in real.items() if k in {r["id"] for r in rows}} if len(rows) >= 2 else real
    keys = _spread_measures(real)
    segmenter = get_backend(args.backend)
    spacing = float(rows[0]["spacing_mm"])
    affine = np.diag([spacing, spacing, spacing, 1.0])
    lowres_all = torch.stack([torch.from_numpy(np.asarray(load_array(r["lr"]), np.float32))
                              for r in rows])  # fmt: skip
    sampler = args.samplers[0]
    settings = [(args.reference_sampler.get(sr.model.denoiser.schedule.name, "dpmpp-2m"), args.sr_reference)]
    settings += [(sampler, n) for n in args.sr_steps]
    out_rows: list[dict] = []
    for name, steps in settings:
        start, measures = time.perf_counter(), {}
        for i in tqdm(range(len(rows)), desc=f"SR {name} {steps} steps", unit="volume"):
            lowres = sr.model.conditioners["lowres"].upsample(lowres_all[i : i + 1], sr.factor)
            with autocast(sr.model.device, args.precision):
                x = generate_sr(sr.model, lowres, [SR_SEED_OFFSET + i], steps=steps, sampler=name).float()
            v = decode_volume(x[0].cpu().numpy(), clean=True)
            masks = {k: v[k] for k in ("lobes", "airway", "vessels")}
            measures[str(i)] = json.loads(
                json.dumps(measure_volume(v["ct"], affine, masks, segmenter), default=str)
            )
        row = {"sampler": name, "steps": steps, "nfe": network_evaluations(name, steps),
               "seconds": time.perf_counter() - start,
               "distances": {k: v for k, v in _distances(measures, real).items() if k in keys}}  # fmt: skip
        out_rows.append(row)
        row["worse_than_reference"] = _matches(row, out_rows[0], keys) if len(out_rows) > 1 else []
        print(f"SR {name:9s} {steps:4d} steps {row['nfe']:4d} NFE {row['seconds']:6.0f} s  mean W/ref "
              f"{_mean_ratio(row, out_rows[0], keys):.2f}  worse: {', '.join(row['worse_than_reference']) or '-'}",
              flush=True)  # fmt: skip
    ok = [r for r in out_rows[1:] if not r["worse_than_reference"]]
    best = min(ok, key=lambda r: r["nfe"], default=None)
    report["sr"] = {"run": args.sr, "cache": args.sr_cache, "measures": keys, "rows": out_rows,
                    "best": None if best is None else {k: best[k] for k in ("sampler", "steps", "nfe")}}  # fmt: skip


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def print_sweep(report: dict) -> None:
    """The table per run, the chosen settings and their PFLOP at paper scale."""
    keys = report["measures"]
    for label, entry in report.get("runs", {}).items():
        ref = entry["rows"][0]
        print(f"\n{label} ({entry['schedule']}): Wasserstein-1 to the held-out volumes, relative to the "
              f"{ref['steps']}-step {ref['sampler']} reference (1.00 = as close as it; mean over {len(keys)} measures)")  # fmt: skip
        print(
            "| sampler | steps | NFE | mean W / ref | measures worse than ref (beyond SE) | p effusion | p cardiomegaly |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in entry["rows"]:
            c = row.get("controllability", {})
            ps = [next((_p(v["p"]) for k, v in c.items() if k.startswith(name)), "") for name in
                  ("pleural_effusion", "cardiomegaly")]  # fmt: skip
            print(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {_mean_ratio(row, ref, keys):.2f} | "
                  f"{', '.join(row['worse_than_reference']) or '-'} | {ps[0]} | {ps[1]} |")  # fmt: skip
        print(f"fewest NFE matching the reference: {entry['best']}")
    sr = report.get("sr")
    if sr:
        ref = sr["rows"][0]
        print(f"\nSR ({sr['run']}): from the held-out volumes' own base-grid arrays, relative to "
              f"{ref['steps']}-step {ref['sampler']} (mean over {len(sr['measures'])} measures)")  # fmt: skip
        print("| sampler | steps | NFE | mean W / ref | measures worse than ref (beyond SE) | seconds |")
        print("|---|---|---|---|---|---|")
        for row in sr["rows"]:
            print(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {_mean_ratio(row, ref, sr['measures']):.2f} | "
                  f"{', '.join(row['worse_than_reference']) or '-'} | {row['seconds']:.0f} |")  # fmt: skip
        print(f"fewest SR NFE matching the reference: {sr['best']}")


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


def _mapping(text: str) -> dict[str, str]:
    """ "a=b,c=d" -> {"a": "b", "c": "d"} (argparse type)."""
    pairs = [item.partition("=") for item in text.split(",") if item]
    if any(not k or not v for k, _, v in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE pairs separated by commas")
    return {k: v for k, _, v in pairs}


def sweep_cost(report: dict, args: argparse.Namespace) -> dict:
    """PFLOP of one 256^3 sample at paper scale with each run's chosen base setting and the chosen SR steps
    (today's defaults: 25 dpmpp-2m base steps with guidance + 10 SR steps)."""
    base_fwd = sample_flops(1, 0, 1.0)["base_forward"]
    sr_fwd = sample_flops(0, 1, 1.0)["sr_forward"]
    passes = 1 if args.guidance == 1.0 else 2
    sr_best = (report.get("sr") or {}).get("best")
    sr_nfe = sr_best["nfe"] if sr_best else 10
    out: dict[str, Any] = {"default_pflop": (passes * 25 * base_fwd + 10 * sr_fwd) / 1e15, "sr_nfe": sr_nfe,
                           "sr_best": sr_best, "target_pflop": 0.1}  # fmt: skip
    for label, entry in report.get("runs", {}).items():
        best = entry["best"]
        if best is None:
            out[label] = None
            continue
        pflop = (passes * best["nfe"] * base_fwd + sr_nfe * sr_fwd) / 1e15
        out[label] = {**best, "pflop": pflop, "meets_target": pflop <= 0.1}
        print(f"{label}: {best['sampler']} {best['steps']} steps ({best['nfe']} NFE) + SR {sr_nfe} NFE = "
              f"{pflop:.3f} PFLOP per 256^3 sample at paper scale (defaults today: {out['default_pflop']:.3f}; "
              f"target 0.1)")  # fmt: skip
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flops", help="FLOPs of one 256^3 sample at paper scale")
    m = sub.add_parser("memory", help="peak RSS of full-volume vs sliding-window SR")
    m.add_argument("--size", type=int, default=256)
    m.add_argument("--preset", default="sr-light")
    m.add_argument("--child", choices=["full", "windowed"], help=argparse.SUPPRESS)
    c = sub.add_parser("sweep", help="schedule x sampler x steps judged by the evaluation measures")
    s = sub.add_parser("segment", help="Dice of the model as a segmenter (CT fixed)")
    for q in (f, m):
        q.add_argument("--steps", type=int, default=25)
        q.add_argument("--sr-steps", type=int, default=10 if q is f else 2)
        q.add_argument("--guidance", type=float, default=3.0)
        q.add_argument("--window", type=int, default=144)
        q.add_argument("--overlap", type=float, default=0.2)
    s.add_argument("--base", required=True)
    s.add_argument("--sr")
    s.add_argument("--cache", required=True)
    s.add_argument("--json", help="also write the report here")
    c.add_argument("--base", action="append", default=[], metavar="LABEL=RUN",
                   help="a base run to sweep (repeatable), e.g. cosine=runs/phantom/base rf=runs/phantom/base_rf")  # fmt: skip
    c.add_argument("--cache", help="the base runs' prepared cache: its test split is the held-out data")
    c.add_argument("--split", default="test", help="the caches' held-out split (default test)")
    c.add_argument("--samplers", nargs="+", default=["dpmpp-2m", "euler", "heun"])
    c.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    c.add_argument("--reference", type=int, default=250, help="steps of the reference setting")
    c.add_argument("--reference-sampler", type=_mapping, default={"cosine": "dpmpp-2m", "rectified-flow": "euler"},
                   help="the reference's sampler per schedule, e.g. cosine=dpmpp-2m,rectified-flow=euler")  # fmt: skip
    c.add_argument("--num-samples", type=int, default=16, help="held-out reports sampled per setting")
    c.add_argument("--pairs", nargs="*", default=["pleural_effusion", "cardiomegaly"],
                   help="controllability pairs run for the reference and the chosen setting (none: skip)")  # fmt: skip
    c.add_argument("--pair-n", type=int, default=8, help="samples per prompt of a pair")
    c.add_argument("--pairs-baseline", metavar="SAMPLER:STEPS",
                   help="compare the chosen setting's p-values with this setting's instead of the reference's "
                        "(e.g. dpmpp-2m:25, today's default, when the reference is too slow for the pairs)")  # fmt: skip
    c.add_argument("--guidance", type=float, default=3.0)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--precision", default="bf16", choices=["32", "bf16"])
    c.add_argument("--backend", default="threshold")
    c.add_argument("--sr", help="an SR run: its steps are swept on the held-out volumes of --sr-cache")
    c.add_argument("--sr-cache", help="the SR run's prepared cache (held-out: its test split)")
    c.add_argument("--sr-steps", type=int, nargs="+", default=[1, 2, 4, 10])
    c.add_argument("--sr-reference", type=int, default=100)
    c.add_argument("--sr-samples", type=int, default=8)
    c.add_argument("--out", default="outputs/sampling_sweep", help="samples, measures and sweep.json")
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
    report = {"flops": cmd_flops, "memory": cmd_memory, "sweep": cmd_sweep, "segment": cmd_segment}[
        args.command
    ](args)
    if args.command == "sweep":
        if args.sr:
            cmd_sweep_sr(args, report)
        previous = Path(args.out) / "sweep.json"  # runs swept before into the same OUT are kept, so one
        if (
            previous.is_file()
        ):  # table can be built run by run (a label or --sr given again replaces its part)
            old = json.loads(previous.read_text())
            report["runs"] = {**{k: v for k, v in old.get("runs", {}).items()}, **report["runs"]}
            report.setdefault("sr", old.get("sr"))
            if not report.get("measures"):
                report["measures"] = old.get("measures", [])
        print_sweep(report)
        report["cost"] = sweep_cost(report, args)
        print(json.dumps({"benchmark": "sampling_sweep", **report["cost"]}))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep.json").write_text(json.dumps(report, indent=2, default=str))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
