"""Report text as tokens: lower-case words split at hyphens, numbers and punctuation, with singular keys.

A term is identified by its key, the tuple of its words in singular form ("ground-glass opacities" and
"Ground glass opacity" share the key ("ground", "glass", "opacity")), so counting, the lexicon and the
check that a generated report mentions a term all agree on simple plurals and hyphenation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# a word (with inner hyphens or apostrophes), a number (with decimals), or one punctuation mark
_TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*|\d+(?:\.\d+)?|[.,;:!?()]")
SENTENCE_END = frozenset(".!?")
PUNCTUATION = frozenset(".,;:!?()")

# irregular plurals of chest-CT words, and words ending in -s that are not plurals
_IRREGULAR = {
    "bronchi": "bronchus", "apices": "apex", "foci": "focus", "emboli": "embolus", "hila": "hilum",
    "varices": "varix", "cortices": "cortex", "vertices": "vertex", "diverticula": "diverticulum",
    "septa": "septum", "calices": "calyx", "lumina": "lumen", "thoraces": "thorax", "nuclei": "nucleus",
    "sulci": "sulcus", "bronchioli": "bronchiolus", "media": "media", "criteria": "criterion",
}  # fmt: skip
_NOT_PLURAL = frozenset(
    "gas pancreas atlas bias canvas has was as its this thus yes series species diabetes lens plus less "
    "mucus pus always perhaps whereas".split()
)


@dataclass(frozen=True)
class Token:
    """One token: its surface form (lower case), its singular key, and whether a hyphen joins it to the
    previous word ("ground-glass" is two tokens, the second with `hyphen=True`)."""

    text: str
    key: str
    hyphen: bool = False

    @property
    def is_word(self) -> bool:
        return self.key[:1].isalpha()


def singular(word: str) -> str:
    """The singular of a lower-case word by simple English rules ("opacities" -> "opacity")."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word in _NOT_PLURAL or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ae") and len(word) > 4:  # bullae, vertebrae, pleurae
        return word[:-1]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "uses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def tokenize(text: str) -> list[Token]:
    """Tokens of `text`; hyphenated words become one token per part."""
    tokens: list[Token] = []
    for match in _TOKEN.finditer(text.lower()):
        piece = match.group()
        if piece[0].isalpha():
            for i, part in enumerate(piece.split("-")):
                tokens.append(Token(part, singular(part), hyphen=i > 0))
        else:
            tokens.append(Token(piece, piece))
    return tokens


def sentences(text: str) -> list[list[Token]]:
    """Tokens of `text` split into sentences (at . ! ? and at blank lines); the end mark is kept."""
    out: list[list[Token]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        current: list[Token] = []
        for token in tokenize(paragraph):
            current.append(token)
            if token.text in SENTENCE_END:
                out.append(current)
                current = []
        if current:
            out.append(current)
    return [s for s in out if any(t.is_word for t in s)]


def term_key(term: str) -> tuple[str, ...]:
    """The key of a term: its words in singular form ("Pleural Effusions" -> ("pleural", "effusion"))."""
    return tuple(t.key for t in tokenize(term) if t.is_word)


def surface(tokens: list[Token]) -> str:
    """Tokens written back as a term: words joined by spaces, or by hyphens where the text had them."""
    out = ""
    for i, token in enumerate(tokens):
        out += ("-" if token.hyphen else " ") + token.key if i else token.key
    return out


def find_key(tokens: list[Token], key: tuple[str, ...]) -> list[int]:
    """Start positions where the token keys spell `key`."""
    n = len(key)
    return [i for i in range(len(tokens) - n + 1) if tuple(t.key for t in tokens[i : i + n]) == key]


def mentions(text: str, term: str) -> bool:
    """True when `text` mentions `term` (case-insensitive; simple plurals and hyphens allowed)."""
    key = term_key(term)
    return bool(key) and bool(find_key(tokenize(text), key))
