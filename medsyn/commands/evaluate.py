"""`medsyn evaluate`: clinical measures, distribution distances and a memorization audit of samples."""

from __future__ import annotations

import argparse
import time

HELP = "Measure generated CT volumes against real ones (metrics.json, report.md, plots) and audit for copies."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True,
                        help="sample folder (OUT/<index>/ from sample.py), phantom folder, prepared cache, "
                             "manifest.csv or folder of NIfTI files")  # fmt: skip
    parser.add_argument("--real", required=True, help="held-out real volumes (same kinds of source)")
    parser.add_argument("--train", help="training volumes for the memorization audit (default: --real, "
                                        "leave-one-out)")  # fmt: skip
    parser.add_argument(
        "--real-split", choices=["train", "val", "test"], help="split of a prepared cache to use as --real"
    )
    parser.add_argument(
        "--train-split", choices=["train", "val", "test"], help="split of a prepared cache to use as --train"
    )
    parser.add_argument("--cache-grid", choices=["hr", "lr"], default="hr",
                        help="grid of a prepared cache given as --real/--train: hr (default), or lr, the base "
                             "model's grid, to evaluate base-only samples")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder for metrics.json, report.md and plots")
    parser.add_argument("--features", help="MedicalNet-style 3D ResNet weights (.pth/.pt/.safetensors); "
                                           "default: a fixed random network, labelled as such")  # fmt: skip
    parser.add_argument("--features-2d", help="2D ResNet weights for the 2.5D FID (default: fixed random)")
    parser.add_argument("--backend", default="threshold",
                        help="segmentation backend re-segmenting every CT: threshold (default) or totalsegmentator")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--percentile", type=float, default=1.0,
                        help="near-copy threshold: this percentile of held-out-to-train distances (default 1)")  # fmt: skip
    parser.add_argument("--feature-size", type=int, default=128,
                        help="input cube of the 3D feature network and slice size of the 2D one (default 128)")  # fmt: skip
    parser.add_argument(
        "--slices-per-plane", type=int, default=16, help="2.5D FID: slices per plane (default 16)"
    )
    parser.add_argument(
        "--voxel-size", type=int, default=32, help="voxel-space grid of the audit (default 32)"
    )
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="device of the feature networks"
    )
    parser.add_argument("--align", metavar="RUN",
                        help="a `train.py align` run: score each sample against its prompt (report-volume and "
                             "word-patch similarity), with the --real volumes and their own and others' reports "
                             "as the reference")  # fmt: skip
    parser.add_argument("--wandb", metavar="PROJECT", nargs="?", const="medsyn-evaluate",
                        help="also log to W&B (offline without a login), project default medsyn-evaluate")  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier evaluation's files in --out"
    )


def run(args: argparse.Namespace) -> int:
    from medsyn.errors import DataError
    from medsyn.evaluation.evaluate import EvaluateOptions, evaluate
    from medsyn.evaluation.report import check_out_dir, write_outputs

    if not 0 < args.percentile < 50:
        raise DataError(f"--percentile {args.percentile:g}: expected a percentile in (0, 50)")
    for name, least in (("voxel_size", 4), ("feature_size", 16), ("slices_per_plane", 1)):
        value = getattr(args, name)
        if value < least:
            raise DataError(f"--{name.replace('_', '-')} {value}: expected at least {least}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    check_out_dir(args.out, args.overwrite)  # before hours of work, not after
    options = EvaluateOptions(
        backend=args.backend, features=args.features, features_2d=args.features_2d, voxel_size=args.voxel_size,
        feature_size=args.feature_size, slices_per_plane=args.slices_per_plane,
        percentile=args.percentile, workers=args.workers, device=args.device, cache_grid=args.cache_grid,
        align=args.align,
    )  # fmt: skip
    began = time.perf_counter()
    result = evaluate(args.samples, args.real, args.train, options, args.real_split, args.train_split)
    write_outputs(result, args.out, args.overwrite, wandb_project=args.wandb)
    print(f"medsyn evaluate: done in {time.perf_counter() - began:.1f} s")
    return 0
