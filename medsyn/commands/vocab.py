"""`medsyn vocab build`: anatomy and pathology vocabularies from report texts, and their review."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Build anatomy and pathology vocabularies from reports (vocab build), or apply an edited review."
DEFAULT_TOP_K = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="SUBCOMMAND", required=True)
    build = sub.add_parser(
        "build",
        help="count affirmed terms, sort them by the chest-CT lexicon, write the lists and review.yaml",
        description="Count affirmed words and 2-3 word phrases in the reports, keep the top K, sort them "
        "into anatomy and pathology, and write anatomy.csv, pathology.csv, cooccurrence.csv, review.yaml "
        "and vocab.json into --out. With --review, the edited review decides the terms instead.",
    )
    build.add_argument("--reports", help="CSV with findings/impression columns (a manifest.csv), or a folder "
                                         "of report.txt files (default with --review: the reports it records)")  # fmt: skip
    build.add_argument("--out", help="output folder (default with --review: the review's folder)")
    build.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                       help=f"candidate terms kept for review, most frequent first (default {DEFAULT_TOP_K})")  # fmt: skip
    build.add_argument("--review", help="an edited review.yaml: its categories, keep flags and added terms "
                                        "are applied and the lists rewritten (in its own folder without --overwrite)")  # fmt: skip
    build.add_argument("--overwrite", action="store_true", help="replace vocabulary files already in --out")


def run(args: argparse.Namespace) -> int:
    from medsyn.errors import ConfigError, DataError
    from medsyn.prompting.corpus import read_corpus
    from medsyn.prompting.vocab import build_vocabulary, existing_outputs, read_review, write_vocabulary

    if args.vocab_command != "build":
        raise ConfigError(f"unknown vocab sub-command {args.vocab_command!r}; expected build")
    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: expected at least 1")
    review, reports, out = None, args.reports, args.out
    if args.review:
        review, recorded = read_review(args.review)
        reports = reports or recorded or None
        out = out or str(Path(args.review).parent)
        if reports is None:
            raise ConfigError(f"--review {args.review}: the review records no reports; pass --reports")
    if reports is None or out is None:
        raise ConfigError("vocab build needs --reports and --out (or --review REVIEW.yaml)")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise DataError(f"--out {out}: is a file; expected a folder")
    in_place = args.review is not None and Path(args.review).resolve().parent == out_path.resolve()
    existing = existing_outputs(out_path)
    if existing and not (args.overwrite or in_place):
        raise DataError(f"{existing[0]} exists; pass --overwrite to replace the vocabulary in {out}")

    texts = read_corpus(reports)
    vocab = build_vocabulary(texts, args.top_k, str(Path(reports).resolve()), review)
    write_vocabulary(out_path, vocab)
    n_anatomy, n_pathology = len(vocab.kept("anatomy")), len(vocab.kept("pathology"))
    print(f"medsyn vocab: {n_anatomy} anatomy and {n_pathology} pathology terms from {len(texts)} reports "
          f"in {out_path} (review.yaml to edit them)")  # fmt: skip
    unseen = [t.term for t in vocab.terms if t.keep and t.count == 0]
    if unseen:
        print(f"medsyn vocab: never affirmed in the reports (kept, count 0): {', '.join(unseen)}")
    return 0
