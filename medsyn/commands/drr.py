"""`medsyn drr`: CT volumes -> frontal radiographs (DRRs) with their reports, in a radiograph cache.

Exit code: 0 when at least one subject is in the cache afterwards (failures are listed in
DIR/failed.csv), 1 when every subject failed, 2 for a user error (bad input, bad options).
"""

from __future__ import annotations

import argparse
import sys

HELP = "Project CT volumes (a CT cache, phantoms or a CT manifest) to frontal radiographs with their reports."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help="a CT cache (medsyn prepare), a phantoms folder (medsyn phantom), or a CT manifest CSV /"
        " CT-RATE directory as medsyn prepare reads it",
    )
    parser.add_argument(
        "--out", required=True, help="radiograph cache directory (finished subjects are skipped)"
    )
    parser.add_argument("--size", type=int, default=256, help="output image size in pixels (square)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--limit", type=int, default=None, help="only the first N subjects")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (hash of the id)")
    parser.add_argument("--overwrite", action="store_true", help="redo subjects already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from medsyn.data.prepare import parse_fractions
    from medsyn.radiograph.prepare import RadiographOptions, make_drrs

    options = RadiographOptions(
        size=args.size,
        workers=args.workers,
        limit=args.limit,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        split_fractions=parse_fractions(args.split),
    )
    result = make_drrs(args.input, args.out, options)
    print(
        f"projected {len(result.done)}, already done {len(result.skipped)}, failed {len(result.failed)}"
        f" -> {args.out}/manifest.csv"
    )
    for failure in result.failed:
        print(f"  failed {failure['id']}: {failure['reason']}", file=sys.stderr)
    return 1 if result.all_failed else 0
