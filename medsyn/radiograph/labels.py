"""Finding labels read from a chest report: pleural effusion side and cardiomegaly, negation-aware.

The two findings the paper's Table 2 checks in generated radiographs. Rules, per sentence (tokens and
NegEx scopes from `medsyn.prompting`):

- Effusion: an affirmed pleural-effusion mention ("effusion", "pleural fluid", "hydrothorax"; not a
  pericardial or joint effusion). Its side comes from the affirmed side words of the same sentences:
  "left" / "right" (not when they name another structure: "left lower lobe", "right heart"), and
  "bilateral", "both", "bibasilar" for both sides; left and right together are bilateral. An effusion
  with no side anywhere in the report is bilateral when written in the plural ("pleural effusions"),
  otherwise its side is unknown: `None`, the radiograph cache's "not known".
- Cardiomegaly: an affirmed "cardiomegaly", or an affirmed enlargement word ("enlarged", "enlargement",
  "large", "increased") within four words of "heart" / "cardiac" in one clause ("the heart is
  enlarged", "enlarged cardiac silhouette"); "heart size is normal" and "not enlarged" are not.
- A finding the report does not mention is absent ("none", False), as in a normal report that lists
  only what it found.
"""

from __future__ import annotations

from medsyn.prompting.negation import affirmed
from medsyn.prompting.text import PUNCTUATION, Token, sentences

EFFUSION_SIDES = ("none", "left", "right", "bilateral")

_BOTH = frozenset({"bilateral", "bilaterally", "both", "bibasilar", "bibasal", "bilat"})
# a side word followed by one of these names another structure ("left lower lobe", "right heart")
_OTHER_STRUCTURE = frozenset(
    "upper lower middle lobe lingula lung apex apical hilum hilar heart ventricle ventricular atrium "
    "atrial mainstem main bronchus internal jugular subclavian arm shoulder breast clavicle rib humerus "
    "kidney hemidiaphragm diaphragm".split()
)
_NOT_PLEURAL = frozenset({"pericardial", "pericardium", "joint"})
_HEART = frozenset({"heart", "cardiac"})
_ENLARGED = frozenset({"enlarged", "enlargement", "large", "larger", "increased"})
_HEART_WINDOW = 4  # words between an enlargement word and "heart"/"cardiac"


def _effusion_mentions(tokens: list[Token], flags: list[bool]) -> list[int]:
    """Positions of affirmed pleural-effusion mentions in one sentence."""
    keys = [t.key for t in tokens]
    found = []
    for i, key in enumerate(keys):
        if not flags[i]:
            continue
        if key == "effusion":
            before = keys[max(0, i - 3) : i]
            if i and keys[i - 1] in _NOT_PLEURAL and "pleural" not in before:
                continue
            found.append(i)
        elif key == "hydrothorax" or key == "fluid" and i and keys[i - 1] == "pleural":
            found.append(i)
    return found


def _sides(tokens: list[Token], flags: list[bool]) -> set[str]:
    """Affirmed side words of one sentence: a subset of {"left", "right", "bilateral"}."""
    keys = [t.key for t in tokens]
    out = set()
    for i, key in enumerate(keys):
        if not flags[i]:
            continue
        if key in _BOTH:
            out.add("bilateral")
        elif key in ("left", "right"):
            following = keys[i + 1 : i + 2]
            if following == ["sided"]:
                following = keys[i + 2 : i + 3]
            if not following or following[0] not in _OTHER_STRUCTURE:
                out.add(key)
    return out


def _enlarged_heart(tokens: list[Token], flags: list[bool]) -> bool:
    """True when an affirmed enlargement word is near "heart"/"cardiac" with no punctuation between."""
    keys = [t.key for t in tokens]
    hearts = [i for i, k in enumerate(keys) if k in _HEART]
    for i, key in enumerate(keys):
        if key not in _ENLARGED or not flags[i]:
            continue
        for h in hearts:
            lo, hi = min(i, h), max(i, h)
            if hi - lo <= _HEART_WINDOW and not any(k in PUNCTUATION for k in keys[lo:hi]):
                return True
    return False


def report_labels(text: str) -> dict:
    """{"effusion": "none" | "left" | "right" | "bilateral" | None (an effusion of unstated side),
    "cardiomegaly": bool} read from a report's text (findings and impression together)."""
    effusion, plural, sides, cardiomegaly = False, False, set(), False
    for sentence in sentences(text):
        flags = affirmed(sentence)
        mentions = _effusion_mentions(sentence, flags)
        if mentions:
            effusion = True
            plural |= any(sentence[i].text != sentence[i].key for i in mentions)
            sides |= _sides(sentence, flags)
        if any(t.key == "cardiomegaly" and f for t, f in zip(sentence, flags, strict=True)):
            cardiomegaly = True
        elif _enlarged_heart(sentence, flags):
            cardiomegaly = True
    if not effusion:
        side = "none"
    elif "bilateral" in sides or {"left", "right"} <= sides:
        side = "bilateral"
    elif sides:
        side = sides.pop()
    else:
        side = "bilateral" if plural else None
    return {"effusion": side, "cardiomegaly": cardiomegaly}
