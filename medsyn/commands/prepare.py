"""`medsyn prepare`: real scans or phantoms -> the training cache (see `medsyn.data.cache`).

Exit code: 0 when at least one subject is in the cache afterwards (failures are listed in
DIR/failed.csv), 1 when every subject failed, 2 for a user error (bad manifest, unknown backend).
"""

from __future__ import annotations

import argparse
import sys

from medsyn.data.prepare import MIN_EXTENT_MM
from medsyn.data.readers import MAX_VOXELS
from medsyn.data.segment import DEFAULT_BACKEND, available_backends

HELP = "Prepare a manifest CSV or CT-RATE directory into a cache of 4-channel volumes with splits."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help="manifest CSV (id, ct, lobes, airway, vessels, ...) or a CT-RATE directory",
    )
    parser.add_argument(
        "--out", required=True, help="cache directory (created; finished subjects are skipped)"
    )
    parser.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        choices=available_backends(),
        help="segmentation backend for masks the input does not give",
    )
    parser.add_argument("--size", type=int, default=256, help="cubic output size in voxels")
    parser.add_argument("--spacing-mm", type=float, default=1.0, help="isotropic output spacing")
    parser.add_argument(
        "--fit",
        choices=["crop", "resize"],
        default="crop",
        help="crop/pad at the spacing, or scale the field of view into the size",
    )
    parser.add_argument("--lr-factor", type=int, default=4, help="nearest downsampling factor of lr.npy")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (hash of the id)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--limit", type=int, default=None, help="only the first N subjects")
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=MAX_VOXELS,
        help="refuse (unread, in failed.csv) a volume whose header claims more voxels (default 1024^3)",
    )
    parser.add_argument(
        "--min-extent-mm",
        type=float,
        default=MIN_EXTENT_MM,
        help=f"refuse a CT smaller than this along any axis (default {MIN_EXTENT_MM:g} mm)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip
    parser.add_argument(
        "--cxr",
        action="store_true",
        help="real radiographs instead: --input is a CSV (image, findings, impression) or a MIMIC-CXR"
        " folder; writes a radiograph cache of --size^2 images (--split, --workers, --limit apply)",
    )


def run(args: argparse.Namespace) -> int:
    from medsyn.data.prepare import PrepareOptions, parse_fractions, prepare
    from medsyn.data.preprocess import PreprocessConfig

    if args.cxr:
        return _run_cxr(args)
    options = PrepareOptions(
        backend=args.backend,
        preprocess=PreprocessConfig(size=args.size, spacing_mm=args.spacing_mm, fit=args.fit),
        lr_factor=args.lr_factor,
        split_fractions=parse_fractions(args.split),
        workers=args.workers,
        limit=args.limit,
        progress=not args.no_progress,
        max_voxels=args.max_voxels,
        min_extent_mm=args.min_extent_mm,
    )
    result = prepare(args.input, args.out, options)
    print(
        f"prepared {len(result.done)}, already cached {len(result.skipped)}, failed {len(result.failed)}"
        f" -> {args.out}/manifest.csv"
    )
    for failure in result.failed:
        print(f"  failed {failure['id']}: {failure['reason']}", file=sys.stderr)
    return 1 if result.all_failed else 0


def _run_cxr(args: argparse.Namespace) -> int:
    from medsyn.data.prepare import parse_fractions
    from medsyn.radiograph.prepare import RadiographOptions, prepare_radiographs

    options = RadiographOptions(
        size=args.size,
        workers=args.workers,
        limit=args.limit,
        progress=not args.no_progress,
        split_fractions=parse_fractions(args.split),
    )
    result = prepare_radiographs(args.input, args.out, options)
    print(
        f"prepared {len(result.done)}, already cached {len(result.skipped)}, failed {len(result.failed)}"
        f" -> {args.out}/manifest.csv"
    )
    for failure in result.failed:
        print(f"  failed {failure['id']}: {failure['reason']}", file=sys.stderr)
    return 1 if result.all_failed else 0
