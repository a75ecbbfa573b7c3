"""The offline `template` backend: a Findings text from sentence templates, deterministic given an rng.

Each pathology is written at the anatomy term it was drawn with, with a size (focal lesions) or a
severity word, and a side for anatomy that takes one; anatomy without a pathology gets a plain
descriptive sentence. No sentence is negative, and every drawn term appears verbatim.
"""

from __future__ import annotations

import numpy as np

from medsyn.prompting.draw import Draw
from medsyn.prompting.lexicon import is_focal, is_lateral, place

SIZES = ("small", "tiny", "large", "subcentimeter", "well-defined", "irregular")
SEVERITIES = ("mild", "moderate", "severe", "minimal", "extensive", "marked")
SIDES = ("left", "right")

# {X}: the pathology phrase(s), {A}: the place; {is}: is / are
FOCAL_TEMPLATES = (
    "There {is} {X} in the {A}.",
    "{X} {is} seen in the {A}.",
    "The {A} demonstrates {X}.",
    "{X} {is} noted within the {A}.",
    "Evaluation of the {A} shows {X}.",
)
DIFFUSE_TEMPLATES = (
    "There {is} {X} involving the {A}.",
    "{X} {is} present in the {A}.",
    "The {A} shows {X}.",
    "{X} {is} noted in the {A}.",
    "Findings of {X} are seen at the {A}.",
)
MEASURED_TEMPLATES = (
    "{X} measuring {mm} mm {is} seen in the {A}.",
    "There {is} {X} in the {A}, measuring up to {mm} mm.",
)
ANATOMY_TEMPLATES = (
    "The {A} {is} within normal limits.",
    "The {A} {is} otherwise unremarkable.",
    "Normal appearance of the {A}.",
    "The {A} {is} well visualized.",
)


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _place(term: str, rng: np.random.Generator) -> str:
    where = place(term)
    if (is_lateral(term) or is_lateral(where)) and rng.uniform() < 0.7:
        where = f"{_pick(rng, SIDES)} {where}"
    return where


def _finding(term: str, rng: np.random.Generator) -> tuple[str, bool]:
    """The pathology with its size or severity word, and whether it is a focal lesion."""
    if is_focal(term):
        return _article(f"{_pick(rng, SIZES)} {term}"), True
    return f"{_pick(rng, SEVERITIES)} {term}", False


def _sentence(template: str, phrases: list[str], where: str, mm: int) -> str:
    text = template.format(X=_join(phrases), A=where, mm=mm, **{"is": "is" if len(phrases) == 1 else "are"})
    return text[0].upper() + text[1:]


def template_findings(draw: Draw, rng: np.random.Generator) -> str:
    """A Findings paragraph naming every term of `draw`."""
    by_site: dict[str, list[str]] = {a: [] for a in draw.anatomy}
    for p, a in zip(draw.pathology, draw.sites, strict=True):
        by_site[a].append(p)
    sentences = []
    for anatomy, pathology in by_site.items():
        where = _place(anatomy, rng)
        if not pathology:
            template = _pick(rng, ANATOMY_TEMPLATES)
            is_ = "are" if where.endswith("s") and not where.endswith(("ss", "us", "is")) else "is"
            text = template.format(A=where, **{"is": is_})
            sentences.append(text[0].upper() + text[1:])
            continue
        findings = [_finding(p, rng) for p in pathology]
        phrases = [f for f, _ in findings]
        focal = all(f for _, f in findings)
        if focal and len(phrases) == 1 and rng.uniform() < 0.3:
            phrase = _article(pathology[0])
            sentences.append(
                _sentence(_pick(rng, MEASURED_TEMPLATES), [phrase], where, int(rng.integers(4, 31)))
            )
        else:
            sentences.append(
                _sentence(_pick(rng, FOCAL_TEMPLATES if focal else DIFFUSE_TEMPLATES), phrases, where, 0)
            )
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)
