"""What makes a base model follow its report? Train variants of one config and test each with
`medsyn controllability` (the steering issue's ablation table).

Each variant is the base config plus dotted overrides (`train.py base` syntax), trained for the same
number of steps in a fresh process, then measured twice:
- text use: the x0 loss on held-out subjects with their own report vs another subject's report, at high
  noise (t = 0.8 and 0.95, where only the report can tell the network where the findings are); the
  ratio shuffled / own is 1.0 for a network that ignores its text;
- controllability: `medsyn controllability` with the default pairs (--n seeds per prompt), whose
  effect sizes and one-tailed p-values are the table's columns.
The peer of every variant is the first one (the config as given), trained in the same run.

    python benchmarks/steering.py --config configs/demo/base.yaml --steps 400 --n 8 --out runs/ablation \\
        --variant random_text="text.model=runs/demo/bert_random" --variant guidance_1=@guidance:1

    python benchmarks/steering.py --reference runs/phantom/base --n 16 --out runs/ablation_phantom \\
        --variant no_ema=@checkpoint:runs/phantom/base/checkpoints/last.ckpt:raw

`--reference RUN` takes an existing run as the reference instead of training one. A variant value
`@guidance:S` samples the reference run with guidance scale S; `@checkpoint:FILE[:raw]` exports the EMA
(or, with `:raw`, the raw) weights of a Lightning checkpoint of a run and samples them. Ends with one JSON
line {variant: {text_gain, pairs: {pair/measure: {effect, p, p_paired}}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def text_gain(run_dir: Path, n: int = 16, times: tuple[float, ...] = (0.8, 0.95)) -> float:
    """Mean over `times` of loss(another subject's report) / loss(own report) on held-out subjects."""
    from medsyn.data.cache import load_array, read_cache_manifest
    from medsyn.data.datamodule import report_text
    from medsyn.diffusion import DiffusionLoss
    from medsyn.generation.run import load_run

    run = load_run(run_dir, stage="base")
    rows = [r for r in read_cache_manifest(run.config["data"]["root"]) if r["split"] != "train"][:n]
    if len(rows) < 2:
        raise SystemExit(f"{run_dir}: need at least 2 held-out subjects in the cache for the text gain")
    x = torch.stack([torch.from_numpy(np.asarray(load_array(r["lr"]), np.float32)) for r in rows])
    texts = [report_text(r, run.config["data"].get("text", "both")) for r in rows]
    model, loss = run.model, DiffusionLoss()
    ids = [r["id"] for r in rows]  # whose own keypatches a keypatch model never retrieves
    x0 = model.to_net(x)
    generator = torch.Generator().manual_seed(0)
    ratios = []
    with torch.no_grad():
        for t in times:
            noise = torch.randn(x0.shape, generator=generator)
            tt = torch.full((len(rows),), float(t))
            own, other = (
                loss(
                    model.denoiser,
                    x0,
                    model.condition({"x": x, **model.report_inputs(tx, ids)}, train=False),
                    t=tt,
                    noise=noise,
                )
                .mean()
                .item()
                for tx in (texts, texts[1:] + texts[:1])
            )
            ratios.append(other / own)
    return float(np.mean(ratios))


def export_checkpoint(ckpt: Path, out_dir: Path, raw: bool = False) -> Path:
    """A run directory holding the EMA (or raw) weights of a Lightning checkpoint, as training exports them."""
    from medsyn.generation.model import build_diffusion_model
    from medsyn.weights import WEIGHTS_FILE, export_weights

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = checkpoint["hyper_parameters"]["config"]
    model = build_diffusion_model(config)
    if raw or "medsyn_ema" not in checkpoint:
        prefix, state = "model.denoiser.", checkpoint["state_dict"]
    else:
        prefix, state = "module.", checkpoint["medsyn_ema"]
    model.denoiser.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    out_dir.mkdir(parents=True, exist_ok=True)
    step = int(checkpoint["global_step"])
    export_weights(out_dir / WEIGHTS_FILE, model.exported_state(), {**config, "global_step": step})
    return out_dir


def run(cmd: list[str], log: Path) -> float:
    began = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"failed ({code}): {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="base run config (the reference variant, trained for --steps)")
    parser.add_argument("--reference", help="an existing base run as the reference (instead of --config)")
    parser.add_argument("--steps", type=int, help="training steps of every trained variant")
    parser.add_argument("--out", required=True, help="folder for the variants' runs and measures")
    parser.add_argument("--n", type=int, default=8, help="seeds per prompt for controllability")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--precision", default="bf16", choices=["32", "bf16"], help="sampling precision")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="k=v k=v"',
                        help="a variant: overrides of the reference config, @guidance:SCALE or @checkpoint:FILE[:raw]")  # fmt: skip
    args = parser.parse_args()
    if (args.config is None) == (args.reference is None):
        parser.error("give either --config (and --steps) or --reference")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steering.log"
    variants = {"reference": ""}
    for item in args.variant:
        name, _, overrides = item.partition("=")
        variants[name] = overrides
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    os.environ.update(env)

    reference = Path(args.reference) if args.reference else out / "reference"
    results: dict[str, dict] = {}
    for name, overrides in variants.items():
        guidance = args.guidance
        run_dir = out / name
        if overrides.startswith("@guidance:"):
            guidance, run_dir = float(overrides.split(":", 1)[1]), reference
        elif overrides.startswith("@checkpoint:"):
            ckpt, _, kind = overrides.split(":", 1)[1].partition(":")
            export_checkpoint(Path(ckpt), run_dir, raw=kind == "raw")
        elif name == "reference" and args.reference:
            run_dir = reference
        else:
            if args.config is None or args.steps is None:
                parser.error(f"variant {name} trains a model: it needs --config and --steps")
            cmd = [sys.executable, "train.py", "base", "--config", args.config, f"run_dir={run_dir}",
                   f"trainer.max_steps={args.steps}", "preview.every_n_steps=1000000", *shlex.split(overrides)]  # fmt: skip
            seconds = run(cmd, log)
            print(f"{name}: trained {args.steps} steps in {seconds:.0f} s", flush=True)
        ctrl = out / f"{name}_control"
        cmd = [sys.executable, "-m", "medsyn", "controllability", "--base", str(run_dir), "--n", str(args.n),
               "--seed", "0", "--steps", str(args.sample_steps), "--guidance", str(guidance), "--out", str(ctrl),
               "--batch-size", "8", "--precision", args.precision, "--overwrite"]  # fmt: skip
        run(cmd, log)
        report = json.loads((ctrl / "controllability.json").read_text(encoding="utf-8"))
        pairs = {
            f"{pair['name']}/{m['measure']}": {
                "effect": round(float(m["effect"]), 4),
                "p": None if m["p"] is None else round(float(m["p"]), 4),
                "p_paired": None if m["p_paired"] is None else round(float(m["p_paired"]), 4),
            }
            for pair in report["pairs"]
            for m in pair["measures"]
        }
        results[name] = {"overrides": overrides, "guidance": guidance, "text_gain": round(text_gain(run_dir), 4),
                         "pairs": pairs}  # fmt: skip
        print(f"{name}: text gain {results[name]['text_gain']:.3f}", flush=True)

    keys = list(next(iter(results.values()))["pairs"])
    print("\n| variant | text gain | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, r in results.items():
        cells = [
            f"{r['pairs'][k]['effect']:+.3g} (p {r['pairs'][k]['p']}, {r['pairs'][k]['p_paired']})"
            for k in keys
        ]
        print(f"| {name} | {r['text_gain']:.3f} | " + " | ".join(cells) + " |")
    print(json.dumps({"steps": args.steps, "reference": str(reference), "n": args.n, "variants": results}))


if __name__ == "__main__":
    main()
