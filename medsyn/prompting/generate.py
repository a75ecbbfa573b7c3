"""Anatomy-pathology prompts: draw terms, write a Findings text, check it names every term.

Prompt i uses the random stream `default_rng([seed, i])` for its terms and wording and carries the
sampling seed `seed + i` (sample.py's convention), so a file does not depend on how many prompts it
has, and the template backend gives the same file for the same seed. A text that misses a drawn term
is asked for again (`retries` times) and the prompt is dropped after that; drops are counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsyn.prompting.draw import Draw, check_counts, draw_terms
from medsyn.prompting.llm import ChatClient, ask, findings_text, instruction
from medsyn.prompting.templates import template_findings
from medsyn.prompting.text import mentions
from medsyn.prompting.vocab import PromptVocabulary

BACKENDS = ("template", "llm")


@dataclass
class PromptSet:
    """The written prompts (JSONL records) and the dropped ones."""

    records: list[dict] = field(default_factory=list)
    drops: list[dict] = field(default_factory=list)


def missing_terms(text: str, draw: Draw) -> list[str]:
    """Drawn terms that `text` does not mention (case-insensitive, simple plurals allowed)."""
    return [t for t in draw.anatomy + draw.pathology if not mentions(text, t)]


def generate_prompts(
    vocab: PromptVocabulary,
    n: int,
    n_anatomy: int,
    n_pathology: int,
    seed: int,
    client: ChatClient | None = None,
    retries: int = 2,
    progress: bool = True,
) -> PromptSet:
    """`n` prompts from the template backend (`client` None) or an LLM endpoint (`client`)."""
    check_counts(vocab, n_anatomy, n_pathology)
    backend = "template" if client is None else "llm"
    out = PromptSet()
    bar = tqdm(range(n), desc="prompts", unit="prompt", disable=not progress, leave=False)
    for i in bar:
        rng = np.random.default_rng([seed, i])
        draw = draw_terms(vocab, n_anatomy, n_pathology, rng)
        message = instruction(list(draw.anatomy), list(draw.pathology))
        missing: list[str] = []
        for _ in range(retries + 1):
            if client is None:
                text = template_findings(draw, rng)
            else:  # a new request seed per try, so a seeded server does not repeat its answer
                text = findings_text(ask(client, message, int(rng.integers(2**31)), retries))
            missing = missing_terms(text, draw)
            if text and not missing:
                break
        terms = {"anatomy": list(draw.anatomy), "pathology": list(draw.pathology)}
        if missing or not text:
            out.drops.append({"index": i, "terms": terms, "missing": missing, "text": text})
            bar.set_postfix(dropped=len(out.drops))
            continue
        record = {"prompt": text, "terms": terms, "seed": seed + i, "backend": backend}
        if client is not None:
            record["model"] = client.model
        out.records.append(record)
    bar.close()
    return out


def write_prompts(path: str | os.PathLike, prompts: PromptSet, meta: dict) -> Path:
    """Write the JSONL file and, beside it, `<name>.drops.json` (run settings, counts, dropped prompts)."""
    from medsyn.io import write_json, write_text

    path = Path(path)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts.records))
    summary = dict(meta, written=len(prompts.records), dropped=len(prompts.drops), drops=prompts.drops)
    side = drops_path(path)
    write_json(side, summary)
    return side


def drops_path(path: str | os.PathLike) -> Path:
    """The summary file beside a prompts file: prompts.jsonl -> prompts.drops.json."""
    path = Path(path)
    return path.with_name(path.stem + ".drops.json")
