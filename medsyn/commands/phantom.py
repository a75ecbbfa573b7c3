"""`medsyn phantom`: write the built-in phantom dataset (volumes, masks, reports, truth, manifest.csv)."""

from __future__ import annotations

import argparse

from medsyn.errors import MedsynError

HELP = "Generate phantom chest CTs with lobe, airway and vessel masks, reports and ground truth."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of phantoms")
    parser.add_argument("--size", type=int, default=64, help="voxels per axis (default 64)")
    parser.add_argument(
        "--spacing-mm", type=float, help="voxel spacing in mm (default 256 / size: a 256 mm field)"
    )
    parser.add_argument("--out", required=True, help="output directory (with manifest.csv)")
    parser.add_argument("--seed", type=int, default=0, help="subject i uses the stream (seed, i)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from medsyn.data.phantom import write_dataset

    if args.size < 8:
        raise MedsynError(f"--size {args.size}: expected at least 8 voxels per axis")
    if args.spacing_mm is not None and args.spacing_mm <= 0:
        raise MedsynError(f"--spacing-mm {args.spacing_mm}: expected a positive spacing")
    out = write_dataset(args.out, args.n, args.size, args.spacing_mm, args.seed, args.workers, args.overwrite)
    print(f"medsyn phantom: {args.n} phantoms and manifest.csv in {out}")
    return 0
