"""Sample chest CT volumes with masks from trained runs: `python sample.py --base RUN --prompt "..." --out DIR`.

Parse, build, run: prompts (and seeds) from the command line or a file, the runs from their
directories, fixed channels from `--fix`, then `medsyn.generation.output.run_sampling` writes OUT/<index>/.
Radiographs: `python sample.py --cxr RUN --prompt "..." --out DIR` with a `train.py cxr` (language model over
VQ-GAN tokens) or `train.py cxr-diffusion` run (`medsyn.generation.cxr.sample_cxr`).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from pathlib import Path

from medsyn.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    from medsyn.diffusion import TIME_GRIDS
    from medsyn.generation.stages import add_sampling_arguments

    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base run directory (model.safetensors, config.yaml)")
    p.add_argument(
        "--cxr", help="instead of --base: a radiograph run directory (train.py cxr or cxr-diffusion)"
    )
    p.add_argument("--temperature", type=float, default=1.0,
                   help="--cxr language model: sampling temperature (0: the most likely code)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=0.95,
                   help="--cxr language model: nucleus sampling mass (1: no cut)")  # fmt: skip
    p.add_argument("--sr", help="super-resolution run directory; without it the base volume is written")
    p.add_argument("--prompt", action="append", default=[], help="a report to condition on (repeatable)")
    p.add_argument("--prompts-file", help='text file (one prompt a line) or JSONL ({"prompt", "seed"})')
    p.add_argument("--out", required=True,
                   help="output directory; a rerun of the same request keeps its finished samples and makes the rest")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (unless a JSONL seed)")
    add_sampling_arguments(p)
    p.add_argument("--grid", default=None, choices=list(TIME_GRIDS),
                   help="time grid (default: the model's schedule's: logsnr for cosine, uniform for rectified flow)")  # fmt: skip
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                   help="guide only for diffusion times t in [LOW, HIGH] (default: 0 1, everywhere)")  # fmt: skip
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="blend the guided estimate with one rescaled to the conditional std (0..1)")  # fmt: skip
    p.add_argument("--fix", action="append", default=[], metavar="CHANNEL=PATH",
                   help="hold a channel (ct, lobes, airway, vessels) fixed to a NIfTI file (repeatable)")  # fmt: skip
    p.add_argument("--resample-rounds", type=int, default=0, help="RePaint resampling rounds per step")
    p.add_argument(
        "--sr-mode", default="full", choices=["full", "window"], help="SR on the full volume or by windows"
    )
    p.add_argument("--window", type=int, default=144, help="SR window size (voxels) in window mode")
    p.add_argument("--overlap", type=float, default=0.2, help="SR window overlap fraction in window mode")
    p.add_argument("--sr-noise", type=float, default=None,
                   help="noise-augmentation level of the SR input (default: the SR run's lowres.noise_sample)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace sample folders medsyn wrote for another request; other files in OUT are kept")  # fmt: skip
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a run's text model to run its own Python code (text.trust_remote_code stored in "
                        "the weights is ignored without this flag)")  # fmt: skip
    return p


def read_prompts(path: str | Path) -> list[tuple[str, int | None]]:
    """(prompt, seed or None) from a text file (one prompt a line) or JSONL ({"prompt": ..., "seed": ...})."""
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read prompts ({err})") from err
    out: list[tuple[str, int | None]] = []
    for n, line in enumerate(lines, 1):
        if not line.startswith("{"):
            out.append((line, None))
            continue
        try:
            row = json.loads(line)
            prompt, seed = row["prompt"], None if row.get("seed") is None else int(row["seed"])
            if not isinstance(prompt, str):
                raise TypeError(f'"prompt" is {type(prompt).__name__}')
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(
                f'{path}:{n}: expected a JSON object with "prompt" and optional "seed" ({err})'
            ) from err
        if not prompt.strip():
            raise DataError(f'{path}:{n}: "prompt" is empty; expected a report text')
        out.append((prompt, seed))
    if not out:
        raise DataError(f"{path}: no prompts in the file")
    return out


def requests(prompts: list[tuple[str, int | None]], num_samples: int, seed: int) -> list[tuple[str, int]]:
    """Each prompt num_samples times; sample i gets seed + i, or its JSONL seed + k for its k-th copy."""
    flat = [(p, s, k) for p, s in prompts for k in range(num_samples)]
    return [(p, s + k if s is not None else seed + i) for i, (p, s, k) in enumerate(flat)]


def main_cxr(args: argparse.Namespace) -> int:
    """`--cxr RUN`: radiographs from a `train.py cxr` or `train.py cxr-diffusion` run."""
    import torch

    from medsyn.generation.cxr import CXRSampleOptions, sample_cxr
    from medsyn.radiograph.output import check_out_dir

    ct_only = [
        flag for flag, given in (("--base", args.base), ("--sr", args.sr), ("--fix", args.fix)) if given
    ]
    if ct_only:
        raise DataError(f"{', '.join(ct_only)}: CT options; --cxr samples radiographs without them")
    prompts = [(p, None) for p in args.prompt] + (
        read_prompts(args.prompts_file) if args.prompts_file else []
    )
    if not prompts:
        raise DataError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    if any(not p.strip() for p in args.prompt):
        raise DataError("--prompt '': empty; expected a report text")
    if args.num_samples < 1:
        raise DataError(f"--num-samples {args.num_samples}: expected a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    check_out_dir(args.out, args.overwrite)  # before any model loads
    options = CXRSampleOptions(temperature=args.temperature, top_p=args.top_p, guidance=args.guidance,
                               steps=args.steps, batch_size=args.batch_size)  # fmt: skip
    began = time.perf_counter()
    sample_cxr(args.cxr, requests(prompts, args.num_samples, args.seed), options, args.out, args.device,
               args.overwrite)  # fmt: skip
    print(f"sample.py: done in {time.perf_counter() - began:.1f} s -> {args.out}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.cxr:
        return main_cxr(args)
    if not args.base:
        raise DataError("pass --base RUN_DIR (a CT base run) or --cxr RUN_DIR (a radiograph run)")
    import torch
    from transformers.utils import logging as hf_logging

    from medsyn.generation.fixed import load_fixed, parse_fix, read_fixed
    from medsyn.generation.output import check_out_dir, run_sampling
    from medsyn.generation.run import load_run
    from medsyn.generation.stages import SampleOptions

    prompts = [(p, None) for p in args.prompt] + (
        read_prompts(args.prompts_file) if args.prompts_file else []
    )
    if not prompts:
        raise DataError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    for prompt in args.prompt:
        if not prompt.strip():
            raise DataError(f"--prompt {prompt!r}: empty; expected a report text (for unconditional samples "
                            "give any prompt with --guidance 0)")  # fmt: skip
    if args.guidance < 0:
        raise DataError(f"--guidance {args.guidance:g}: expected a scale >= 0 (0: unconditional, 1: conditional "
                        "without guidance, above 1: stronger guidance)")  # fmt: skip
    if args.sr_noise is not None and not args.sr:
        raise DataError("--sr-noise sets the SR model's input noise; it needs --sr RUN_DIR")
    if args.num_samples < 1:
        raise DataError(f"--num-samples {args.num_samples}: expected a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    out = Path(args.out)
    check_out_dir(out, args.overwrite)  # before any model loads; run_sampling checks the samples in it
    options = SampleOptions(
        steps=args.steps, sr_steps=args.sr_steps, sampler=args.sampler, guidance=args.guidance,
        guidance_interval=tuple(args.guidance_interval), guidance_rescale=args.guidance_rescale,
        resample_rounds=args.resample_rounds, sr_mode=args.sr_mode, window=args.window,
        overlap=args.overlap, lowres_noise=args.sr_noise, batch_size=args.batch_size, precision=args.precision,
        grid=args.grid,
    )  # fmt: skip
    raw = read_fixed(parse_fix(args.fix))  # bad files fail here, before any model loads
    hf_logging.disable_progress_bar()
    trust = args.trust_remote_code
    base = load_run(args.base, args.device, stage="base", trust_remote_code=trust)
    sr = load_run(args.sr, args.device, stage="sr", trust_remote_code=trust) if args.sr else None
    options.check_models(base, sr)
    grid = sr.grid if sr is not None else base.grid
    fixed = load_fixed(raw, grid, base.hr_grid, base.factor) if raw else None
    print(f"sample.py: {len(prompts) * args.num_samples} sample(s) on the grid {list(grid.shape)} at "
          f"{grid.spacing[0]:g} mm ({grid.source}) -> {out}")  # fmt: skip
    began = time.perf_counter()
    run_sampling(
        base, sr, requests(prompts, args.num_samples, args.seed), options, out, fixed, args.overwrite
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB on Linux
    print(f"sample.py: done in {time.perf_counter() - began:.1f} s; peak RSS {peak:.2f} GB")
    return 0


if __name__ == "__main__":
    from medsyn.cli import run_cli

    # SIGTERM unwinds as Ctrl-C does: the sample being written is removed, finished samples stay
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(run_cli(main, "sample.py", build_parser().parse_args()))
