"""NegEx-style negation rules: which words of a report sentence are affirmed.

After Chapman et al., "A simple algorithm for identifying negated findings and diseases in discharge
summaries" (J Biomed Inform 2001), with the trigger lists reduced to chest-CT report wording.

Rules, applied to one sentence's tokens from left to right; at each position the longest trigger
phrase wins, so "no change in" (pseudo) beats "no" and "not seen" (post) beats "not":

- PSEUDO triggers look like negations but negate nothing ("no change in the nodule" affirms the
  nodule): they are skipped.
- PRE triggers ("no", "without", "no evidence of", "negative for", "absence of", ...) negate the words
  after them. The scope ends at the end of the sentence, at ; : ( ), at a TERMINATION term ("but",
  "however", "although", "except", "which", "there is", ...), at another trigger, or at a comma - except
  in a list, where the rest of the clause holds "or"/"nor" ("no effusion, pneumothorax or consolidation"
  negates all three).
- POST triggers ("is absent", "has resolved", "not seen", "ruled out", ...) negate the words before
  them, back to the previous punctuation mark, termination term or trigger.
- The trigger words themselves are never affirmed. Everything else is affirmed: uncertain mentions
  ("possible nodule") count as mentions, as the vocabulary only needs what the reports talk about.
"""

from __future__ import annotations

from medsyn.prompting.text import SENTENCE_END, Token, tokenize

PRE_TRIGGERS = (
    "no", "not", "without", "never", "none", "neither", "nor", "no evidence of", "no sign of",
    "no signs of", "no finding of", "no findings of", "negative for", "free of", "clear of", "absence of",
    "resolution of", "no longer", "rule out", "no definite", "no suspicious",
    "not demonstrate", "fails to reveal", "no new",
)  # fmt: skip
POST_TRIGGERS = (
    "is absent", "are absent", "absent", "resolved", "has resolved", "have resolved", "is resolved",
    "are resolved", "ruled out", "is ruled out", "excluded", "not seen", "not identified", "not present",
    "not visualized", "not demonstrated", "not evident", "not appreciated", "no longer seen",
    "no longer present", "no longer visualized", "has cleared", "have cleared",
)  # fmt: skip
PSEUDO_TRIGGERS = (
    "no change", "no interval change", "no significant change", "no significant interval change",
    "not changed", "no increase", "no decrease", "without change", "without interval change",
    "not only", "not significantly changed", "no further change", "gram negative",
)  # fmt: skip
TERMINATION = (
    "but", "however", "although", "though", "except", "whereas", "while", "yet", "nevertheless",
    "aside from", "apart from", "which", "there is", "there are", "otherwise",
)  # fmt: skip
# marks that end a pre-negation scope (a comma only outside a list)
SCOPE_END = frozenset(";:()") | SENTENCE_END
_LIST_WORDS = frozenset({"or", "nor"})


def _phrases(triggers: tuple[str, ...]) -> dict[tuple[str, ...], None]:
    return {tuple(t.text for t in tokenize(p)): None for p in triggers}


_KINDS = {
    "pseudo": _phrases(PSEUDO_TRIGGERS),
    "post": _phrases(POST_TRIGGERS),
    "pre": _phrases(PRE_TRIGGERS),
    "end": _phrases(TERMINATION),
}
_ORDER = ("pseudo", "post", "pre", "end")  # equal lengths: pseudo before post before pre
_LONGEST = max(len(p) for kind in _KINDS.values() for p in kind)


def _match(words: list[str], i: int) -> tuple[str, int] | None:
    """The longest trigger starting at `i`: (kind, length), or None."""
    for n in range(min(_LONGEST, len(words) - i), 0, -1):
        phrase = tuple(words[i : i + n])
        for kind in _ORDER:
            if phrase in _KINDS[kind]:
                return kind, n
    return None


def _is_list(words: list[str], start: int) -> bool:
    """True when the clause from `start` (up to a scope end or termination) holds "or"/"nor"."""
    for i in range(start, len(words)):
        found = _match(words, i)
        if words[i] in SCOPE_END or found is not None and found[0] != "pre":
            return False
        if words[i] in _LIST_WORDS:
            return True
    return False


def affirmed(tokens: list[Token]) -> list[bool]:
    """Per token of one sentence: True when it is a word mentioned affirmatively (see the module rules)."""
    words = [t.text for t in tokens]
    flags = [t.is_word for t in tokens]
    negating = False  # inside a pre-negation scope
    clause_start = 0  # where a post trigger's backward scope begins
    i = 0
    while i < len(words):
        found = _match(words, i)
        if found is not None:
            kind, n = found
            flags[i : i + n] = [False] * n
            if kind == "post":
                flags[clause_start:i] = [False] * (i - clause_start)
            negating = kind == "pre"
            i += n
            clause_start = i
            continue
        word = words[i]
        if word in SCOPE_END or word == "," and not (negating and _is_list(words, i + 1)):
            negating = False
            clause_start = i + 1
        elif negating:
            flags[i] = False
        i += 1
    return flags


def is_trigger_word(word: str) -> bool:
    """True for a word that starts a negation or termination phrase (never a vocabulary term)."""
    return any(phrase[0] == word for kind in _KINDS.values() for phrase in kind)
