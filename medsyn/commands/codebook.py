"""`medsyn codebook build`: the visual codebook of keypatches from an align run and a prepared cache (CT
volumes or radiographs, the kind the run was trained on)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsyn.alignment.codebook import DEFAULT_K1, DEFAULT_K2

HELP = "Build the visual codebook of keypatches (word-patch alignment) from an align run and a cache."
SHEET_WORDS, SHEET_PER_WORD = 8, 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="codebook_command", metavar="SUBCOMMAND", required=True)
    build = sub.add_parser(
        "build",
        help="embed the split's report-image pairs and keep the best word-patch matches as keypatches",
        description="Embed every (report, image) pair of the cache's --split with the align run (CT volumes "
        "of a CT cache for a 3D run, radiographs of a `medsyn drr` cache for a 2D one); keep the K1 pairs of "
        "highest global report-image similarity; in each, every word's most similar patch is a candidate "
        "scored by that similarity; the K2 best candidates are the keypatches (a patch chosen by two words "
        "of its report is kept once). Writes codebook.safetensors (features, patch pixels), codebook.json "
        "(one record per keypatch: word, score, subject, patch index, box [start, stop] per axis of the "
        "subject's image; the align run's path and sha256, k1, k2, cache, its kind, split) and "
        "keypatches.png (the best keypatches of the most frequent words) into --out.",
    )
    build.add_argument("--align", required=True, help="run directory of `python train.py align`")
    build.add_argument(
        "--data", required=True, help="prepared CT or radiograph cache (a folder with manifest.csv)"
    )
    build.add_argument("--out", required=True, help="output folder for the codebook")
    build.add_argument(
        "--k1",
        type=int,
        default=DEFAULT_K1,
        help=f"report-image pairs kept, by global similarity (default {DEFAULT_K1}: most of "
        "the phantom demo's training split; all pairs when the split has fewer)",
    )
    build.add_argument(
        "--k2",
        type=int,
        default=DEFAULT_K2,
        help=f"keypatches kept, by word-patch similarity (default {DEFAULT_K2}: about 4 per kept pair)",
    )
    build.add_argument(
        "--split",
        default="train",
        choices=("train", "val", "test"),
        help="cache split to build from (default train)",
    )
    build.add_argument("--batch-size", type=int, default=8, help="subjects embedded at a time (default 8)")
    build.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the align model runs (default cpu)"
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing only the codebook's own files",
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from medsyn.alignment.codebook import JSON_FILE, SHEET_FILE, Codebook, check_out_dir, check_pairs
    from medsyn.alignment.data import PairCache
    from medsyn.alignment.run import load_align_run
    from medsyn.alignment.sheet import frequent_words, write_keypatch_sheet
    from medsyn.errors import ConfigError, DataError

    for name in ("k1", "k2", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least 1")
    out = Path(args.out)
    check_out_dir(out, args.overwrite)  # before the long part
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    hf_logging.disable_progress_bar()  # the text encoder's loading bar
    data = PairCache.open(args.data)
    align = load_align_run(args.align, args.device)
    check_pairs(align, data)  # before the long part
    codebook = Codebook.build(align, args.data, args.k1, args.k2, args.split, args.batch_size)
    codebook.save(out, overwrite=args.overwrite)
    shown = {
        codebook.keypatches[i].subject
        for _, ix in frequent_words(codebook, SHEET_WORDS)
        for i in ix[:SHEET_PER_WORD]
    }
    rows = {row["id"]: row for row in data.rows(args.split)}
    volumes = {s: data.load(rows[s]) for s in shown if s in rows}
    write_keypatch_sheet(out / SHEET_FILE, codebook, volumes, SHEET_WORDS, SHEET_PER_WORD)
    info = codebook.info
    print(
        f"medsyn codebook: {len(codebook)} keypatches from {len(codebook.pairs)} of {info['subjects']} "
        f"{info['split']} pairs -> {out / JSON_FILE}, {out / SHEET_FILE}"
    )
    return 0
