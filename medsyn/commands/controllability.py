"""`medsyn controllability`: prompt pairs that differ in one finding, sampled with shared seeds, measured,
and compared with one-tailed t-tests (MedSyn Tables II-IV); see `medsyn.evaluation.controllability`."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsyn.errors import DataError

HELP = "Test whether samples follow their report: prompt pairs, shared seeds, measures, one-tailed t-tests."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medsyn.data.segment import DEFAULT_BACKEND, available_backends
    from medsyn.generation.stages import add_sampling_arguments

    parser.add_argument("--base", required=True, help="base run directory (model.safetensors, config.yaml)")
    parser.add_argument(
        "--sr", help="super-resolution run directory; without it the base volumes are measured"
    )
    parser.add_argument("--pairs", help="YAML or JSONL file of pairs {name, a, b, measure, direction} "
                        "(default: effusion, cardiomegaly, bullae, effusion side, right upper lobe nodule)")  # fmt: skip
    parser.add_argument("--n", type=int, default=32, help="samples per prompt (default 32, as the paper)")
    parser.add_argument("--seed", type=int, default=0, help="both prompts of a pair use seeds S .. S+N-1")
    parser.add_argument(
        "--out", required=True, help="output directory (controllability.json, report.md, ...)"
    )
    add_sampling_arguments(parser)
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=available_backends(),
                        help=f"segmentation backend for the measures (default {DEFAULT_BACKEND})")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace sample folders medsyn wrote for another request; write beside other files")  # fmt: skip
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a run's text model to run its own Python code")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from medsyn.evaluation.controllability import (
        DEFAULT_PAIRS,
        check_output_dir,
        load_pairs,
        run_controllability,
    )
    from medsyn.generation.run import load_run
    from medsyn.generation.stages import SampleOptions

    pairs = load_pairs(args.pairs) if args.pairs else list(DEFAULT_PAIRS)
    if args.n < 2:
        raise DataError(f"--n {args.n}: expected at least 2 samples per prompt (a t-test needs 2 per side)")
    if args.guidance < 0:
        raise DataError(f"--guidance {args.guidance:g}: expected a scale >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    options = SampleOptions(steps=args.steps, sr_steps=args.sr_steps, sampler=args.sampler, guidance=args.guidance,
                            batch_size=args.batch_size, precision=args.precision)  # fmt: skip
    check_output_dir(Path(args.out), args.overwrite)  # before any model loads
    hf_logging.disable_progress_bar()
    base = load_run(args.base, args.device, stage="base", trust_remote_code=args.trust_remote_code)
    sr = (
        load_run(args.sr, args.device, stage="sr", trust_remote_code=args.trust_remote_code)
        if args.sr
        else None
    )
    prompts = len({p for pair in pairs for p in (pair.a, pair.b)})
    print(
        f"medsyn controllability: {len(pairs)} pair(s), {prompts} prompt(s) x {args.n} samples -> {args.out}"
    )
    result = run_controllability(base, sr, pairs, args.n, args.seed, options, args.out, backend=args.backend,
                                 overwrite=args.overwrite)  # fmt: skip
    passed = sum(m["significant"] for pair in result["pairs"] for m in pair["measures"])
    total = sum(len(pair["measures"]) for pair in result["pairs"])
    print(f"medsyn controllability: {passed} of {total} measure(s) moved as prompted at p < {result['alpha']:g}; "
          f"see {args.out}/report.md")  # fmt: skip
    return 0
