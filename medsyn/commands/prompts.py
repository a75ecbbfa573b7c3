"""`medsyn prompts`: descriptive Findings from drawn anatomy and pathology terms, as JSONL for sample.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "Write anatomy-pathology prompts (JSONL for sample.py --prompts-file) from templates or an LLM."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab", required=True, help="folder (or vocab.json) written by `medsyn vocab build`"
    )
    parser.add_argument("--n", type=int, required=True, help="number of prompts to draw")
    parser.add_argument("--anatomy", type=int, default=2, help="anatomy terms per prompt (default 2)")
    parser.add_argument("--pathology", type=int, default=2, help="pathology terms per prompt (default 2)")
    parser.add_argument("--backend", choices=["template", "llm"], default="template",
                        help="template (offline, default) or llm (an OpenAI-compatible chat endpoint)")  # fmt: skip
    parser.add_argument("--url", help="llm: server URL, e.g. http://127.0.0.1:8000 (vLLM), :8080 (llama.cpp), "
                                      ":11434 (Ollama); /v1/chat/completions is appended unless present")  # fmt: skip
    parser.add_argument("--model", help="llm: model name the server knows")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="llm: environment variable holding the API key, sent as a Bearer header "
                             "(default OPENAI_API_KEY; unset: no header)")  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="llm: seconds to wait for an answer (default 60)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="llm: sampling temperature (default 0.7)"
    )
    parser.add_argument("--retries", type=int, default=2,
                        help="new tries when a text misses a term or a request fails (default 2)")  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="prompt i draws from (seed, i) and carries seed + i"
    )
    parser.add_argument("--out", required=True, help="output JSONL file (dropped prompts: <name>.drops.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from medsyn.errors import ConfigError, DataError
    from medsyn.prompting.generate import drops_path, generate_prompts, write_prompts
    from medsyn.prompting.llm import ChatClient
    from medsyn.prompting.vocab import read_vocab

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: expected at least 1 prompt")
    if args.retries < 0:
        raise ConfigError(f"--retries {args.retries}: expected 0 or more")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g}: expected a positive number of seconds")
    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; expected a .jsonl file name")
    for path in (out, drops_path(out)):
        if path.exists() and not args.overwrite:
            raise DataError(f"{path} exists; pass --overwrite to replace it")
    client = None
    if args.backend == "llm":
        if not args.url or not args.model:
            raise ConfigError("--backend llm needs --url (an OpenAI-compatible server) and --model")
        client = ChatClient(args.url, args.model, os.environ.get(args.api_key_env) or None,
                            timeout=args.timeout, temperature=args.temperature)  # fmt: skip
    vocab = read_vocab(args.vocab)
    prompts = generate_prompts(vocab, args.n, args.anatomy, args.pathology, args.seed, client, args.retries,
                               progress=not args.no_progress)  # fmt: skip
    meta = {
        "vocab": str(Path(args.vocab).resolve()),
        "backend": args.backend,
        "model": args.model if client else None,
        "url": client.endpoint if client else None,
        "seed": args.seed,
        "requested": args.n,
        "anatomy": args.anatomy,
        "pathology": args.pathology,
        "retries": args.retries,
    }
    side = write_prompts(out, prompts, meta)
    dropped = len(prompts.drops)
    note = (
        f"; {dropped} dropped (a term missing after {args.retries + 1} tries, see {side})" if dropped else ""
    )
    print(f"medsyn prompts: {len(prompts.records)} prompts in {out}{note}")
    return 0
