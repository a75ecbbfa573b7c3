"""`medsyn evaluate-cxr`: FID of generated radiographs and whether their findings survive; see
`medsyn.evaluation.cxr`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from medsyn.errors import DataError

HELP = (
    "Measure generated radiographs against real ones: FID on 2D features and a finding classifier (Table 2)."
)
SPLITS = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, action="append", metavar="DIR",
                        help="sample folder from `sample.py --cxr` (OUT/<index>/image.png + meta.json); "
                             "repeat for several generators")  # fmt: skip
    parser.add_argument(
        "--real", required=True, metavar="CACHE", help="radiograph cache of real held-out images"
    )
    parser.add_argument("--real-split", default="test", choices=SPLITS, help="split of --real (default test)")
    parser.add_argument("--train", required=True, metavar="CACHE",
                        help="radiograph cache the finding classifier is trained on")  # fmt: skip
    parser.add_argument(
        "--train-split", default="train", choices=SPLITS, help="split of --train (default train)"
    )
    parser.add_argument("--out", required=True, help="output folder: metrics.json, report.md, montage.png, "
                                                     "confusion.png")  # fmt: skip
    parser.add_argument("--features", metavar="PATH",
                        help="2D ResNet weights (.safetensors, or .pth/.pt loaded with weights_only); "
                             "default: a fixed random ResNet-18, labelled as such")  # fmt: skip
    parser.add_argument("--classifier", metavar="DIR", help="folder of the finding classifier: reused when it "
                        "was trained on this --train split with these settings, else trained and written there "
                        "(default OUT/classifier)")  # fmt: skip
    parser.add_argument(
        "--size", type=int, default=128, help="image size for features and classifier (default 128)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="classifier training epochs (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the classifier and the random features")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier evaluation's files in --out"
    )


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this evaluation (for report.md), rebuilt from the parsed arguments."""
    words = ["medsyn", "evaluate-cxr"]
    for folder in args.samples:
        words += ["--samples", folder]
    names = ("real", "real_split", "train", "train_split", "out", "features", "classifier", "size", "epochs",
             "seed", "device")  # fmt: skip
    for name in names:
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(w) for w in words + (["--overwrite"] if args.overwrite else []))


def run(args: argparse.Namespace) -> int:
    from medsyn.evaluation.cxr import CxrOptions, evaluate_cxr
    from medsyn.evaluation.cxr_report import check_out_dir, write_outputs

    if args.size < 16:
        raise DataError(f"--size {args.size}: expected at least 16 pixels")
    if args.epochs < 1:
        raise DataError(f"--epochs {args.epochs}: expected at least 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    check_out_dir(args.out, args.overwrite)  # before any work
    options = CxrOptions(
        size=args.size, features=args.features, epochs=args.epochs, seed=args.seed, device=args.device,
        classifier=args.classifier or str(Path(args.out) / "classifier"),
    )  # fmt: skip
    evaluation = evaluate_cxr(args.samples, args.real, args.train, options, args.real_split, args.train_split)
    write_outputs(evaluation, args.out, args.overwrite, command_line(args))
    print(f"medsyn evaluate-cxr: done in {evaluation.metrics['seconds']:.1f} s; see {args.out}/report.md")
    return 0
