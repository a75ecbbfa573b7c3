"""`medsyn keypatches`: the codebook's keypatches retrieved for a new report, word by word, as JSON.

The JSON (--out) holds: `prompt`, `align_run`, `align_sha256`, `codebook`, `codebook_align_sha256`,
`k3`, `exclude_subject`, `words` (one entry per word of the report: `word`, `position`, and `keypatches`,
its k3 best, each with `index` into the codebook, `score` (cosine similarity to the word), `built_by`
(the word that chose the keypatch when the codebook was built), `build_score`, `subject`, `patch_index`
and `box` ([start, stop] per axis of the subject's image: 3 axes of a CT codebook's base-resolution
volume, 2 of a radiograph codebook's image)) and `tokens` (the keypatch indices in `keypatch_tokens`
order: word by word, each keypatch once).
"""

from __future__ import annotations

import argparse

from medsyn.alignment.codebook import DEFAULT_K3

HELP = "Retrieve the codebook's keypatches for a report: per word its best k3 keypatches (JSON)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The JSON: prompt, align_run, align_sha256, codebook, codebook_align_sha256, k3, exclude_subject; "
        "words: per word of the report its word, position and keypatches (index into the codebook, score, "
        "built_by: the word that chose it at build time, build_score, subject, patch_index, box: "
        "[start, stop] per axis of the subject's image, the base-resolution volume of a CT codebook or the "
        "radiograph of a 2D one); tokens: the keypatch indices "
        "word by word, each once (the order of keypatch_tokens)."
    )
    parser.add_argument("--align", required=True, help="run directory of `python train.py align`")
    parser.add_argument("--codebook", required=True, help="folder of `medsyn codebook build`")
    parser.add_argument("--prompt", required=True, help="the report text")
    parser.add_argument(
        "--k3", type=int, default=DEFAULT_K3, help=f"keypatches per word (default {DEFAULT_K3})"
    )
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--exclude-subject", help="never return keypatches cut from this subject's image")
    parser.add_argument(
        "--force",
        action="store_true",
        help="use a codebook built with another align run (its features are then in another embedding space)",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the align model runs (default cpu)"
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from medsyn.alignment.codebook import Codebook, retrieve_for_report
    from medsyn.alignment.run import load_align_run
    from medsyn.errors import ConfigError, DataError
    from medsyn.io import write_json

    if args.k3 < 1:
        raise ConfigError(f"--k3 {args.k3}: expected at least 1")
    if not args.prompt.strip():
        raise ConfigError("--prompt: empty report")
    codebook = Codebook.load(args.codebook)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available; use --device cpu")
    hf_logging.disable_progress_bar()  # the text encoder's loading bar
    align = load_align_run(args.align, args.device)
    words, found = retrieve_for_report(
        codebook, align, args.prompt, args.k3, args.exclude_subject, args.force
    )
    entries = []
    for w, word in enumerate(words):
        hits = []
        for index, score in zip(found.indices[w].tolist(), found.scores[w].tolist(), strict=True):
            kp = codebook.keypatches[index]
            hits.append(
                {
                    "index": index,
                    "score": score,
                    "built_by": kp.word,
                    "build_score": kp.score,
                    "subject": kp.subject,
                    "patch_index": kp.patch_index,
                    "box": [list(b) for b in kp.box],
                }
            )
        entries.append({"word": word, "position": w, "keypatches": hits})
    tokens = found.unique()
    write_json(
        args.out,
        {
            "prompt": args.prompt,
            "align_run": str(align.run_dir.resolve()),
            "align_sha256": align.sha256,
            "codebook": str(codebook.path.resolve()),
            "codebook_align_sha256": codebook.align_sha256,
            "k3": args.k3,
            "exclude_subject": args.exclude_subject,
            "words": entries,
            "tokens": tokens,
        },
    )
    print(f"medsyn keypatches: {len(tokens)} keypatches for {len(entries)} words -> {args.out}")
    return 0
