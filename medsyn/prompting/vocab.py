"""Anatomy and pathology vocabularies from report texts (paper section 2.1, "Designing vocabularies").

Candidates are words and 2-3 word phrases of affirmed mentions (`medsyn.prompting.negation`) that hold
no stop word, trigger word or number. The top K by count are sorted into anatomy, pathology, modifier
or other by the lexicon (`medsyn.prompting.lexicon`); a reviewer edits that list (review.yaml) and the
edited list is measured again on the corpus: term count, document frequency, and anatomy x pathology
co-occurrence within a sentence.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medsyn.errors import DataError
from medsyn.prompting.lexicon import (
    ANATOMY_CATEGORY,
    CATEGORIES,
    MODIFIER_CATEGORY,
    PATHOLOGY_CATEGORY,
    categorize,
)
from medsyn.prompting.negation import affirmed, is_trigger_word
from medsyn.prompting.text import Token, sentences, surface, term_key

MAX_WORDS = 3
VOCAB_FORMAT = "medsyn-vocab"
VOCAB_VERSION = 1
STOP_WORDS = frozenset(
    """a an the and or nor of in on at to for from by with within without into onto over under about
    above below between across along around through throughout near adjacent than as is are was were be
    been being has have had do does did this that these those there here it its they their which who whom
    what when where while also again still only just very more most less least some any each every all
    both either other such same otherwise seen noted identified present demonstrated visualized
    appears appear appearing measuring measures measure measured approximately about up down
    consistent suggest suggests suggestive likely possible possibly probable probably may might could
    can cannot would should will findings finding impression report comparison study exam examination
    evidence sign signs change changes interval unchanged stable compared prior previous previously
    cm mm ml hu x per""".split()
)  # fmt: skip

Document = list[tuple[list[Token], list[bool]]]  # sentences: tokens and affirmed flags


@dataclass
class Term:
    """One vocabulary term with its review decision and its counts in the corpus."""

    term: str
    category: str
    keep: bool = True
    count: int = 0
    doc_freq: int = 0
    qualifies: str | None = None  # the lexicon entry a modifier phrase qualifies


@dataclass
class Vocabulary:
    """Reviewed terms, their co-occurrence, and where they came from."""

    terms: list[Term]
    cooccurrence: dict[tuple[str, str], int] = field(default_factory=dict)  # (anatomy, pathology)
    documents: int = 0
    source: str = ""
    top_k: int | None = None

    def kept(self, category: str) -> list[Term]:
        """Kept terms of one category, most frequent first."""
        chosen = [t for t in self.terms if t.keep and t.category == category]
        return sorted(chosen, key=lambda t: (-t.count, -t.doc_freq, t.term))


def analyse(texts: Iterable[str]) -> list[Document]:
    """Each report as sentences of tokens with their affirmed flags."""
    return [[(tokens, affirmed(tokens)) for tokens in sentences(text)] for text in texts]


def _candidate_word(token: Token, flag: bool) -> bool:
    return flag and token.is_word and token.key not in STOP_WORDS and not is_trigger_word(token.text)


def count_candidates(documents: list[Document], max_words: int = MAX_WORDS) -> list[Term]:
    """Every candidate word and phrase of affirmed mentions with its count and document frequency,
    most frequent first (ties: higher document frequency, then alphabetical)."""
    counts: Counter[tuple[str, ...]] = Counter()
    doc_freq: Counter[tuple[str, ...]] = Counter()
    forms: dict[tuple[str, ...], Counter[str]] = {}
    for document in documents:
        seen: set[tuple[str, ...]] = set()
        for tokens, flags in document:
            ok = [_candidate_word(t, f) for t, f in zip(tokens, flags, strict=True)]
            for i in range(len(tokens)):
                for n in range(1, max_words + 1):
                    if i + n > len(tokens) or not ok[i + n - 1]:
                        break
                    # a phrase does not start in the middle of a hyphenated word
                    if tokens[i].hyphen or i + n < len(tokens) and tokens[i + n].hyphen:
                        continue
                    key = tuple(t.key for t in tokens[i : i + n])
                    counts[key] += 1
                    seen.add(key)
                    forms.setdefault(key, Counter())[surface(tokens[i : i + n])] += 1
        doc_freq.update(seen)
    terms = [
        Term(forms[k].most_common(1)[0][0], "", count=c, doc_freq=doc_freq[k]) for k, c in counts.items()
    ]
    return sorted(terms, key=lambda t: (-t.count, -t.doc_freq, t.term))


def propose(documents: list[Document], top_k: int) -> list[Term]:
    """The top K candidates, sorted into categories by the lexicon; only anatomy, pathology and modifier
    terms that are lexicon entries themselves are kept (qualified forms and "other" wait for review)."""
    terms = count_candidates(documents)[:top_k]
    for term in terms:
        term.category, term.qualifies = categorize(term.term)
        term.keep = term.qualifies is None and term.category in (
            ANATOMY_CATEGORY, PATHOLOGY_CATEGORY, MODIFIER_CATEGORY,
        )  # fmt: skip
    return terms


def measure(documents: list[Document], terms: list[Term]) -> dict[tuple[str, str], int]:
    """Set each term's count and document frequency (affirmed mentions) in place; return the number of
    sentences in which each kept anatomy and kept pathology term are both mentioned."""
    keys: dict[tuple[str, ...], list[Term]] = {}
    for term in terms:
        key = term_key(term.term)
        if not key:
            raise DataError(f"vocabulary term {term.term!r}: expected at least one word")
        keys.setdefault(key, []).append(term)
        term.count = term.doc_freq = 0
    longest = max((len(k) for k in keys), default=0)
    pairs: Counter[tuple[str, str]] = Counter()
    for document in documents:
        in_document: set[tuple[str, ...]] = set()
        for tokens, flags in document:
            words = [t.key if f else None for t, f in zip(tokens, flags, strict=True)]  # None: not affirmed
            in_sentence: set[tuple[str, ...]] = set()
            for i in range(len(words)):
                for n in range(1, longest + 1):
                    if i + n > len(words) or words[i + n - 1] is None:
                        break
                    key = tuple(words[i : i + n])
                    if key in keys:
                        for term in keys[key]:
                            term.count += 1
                        in_sentence.add(key)
            in_document |= in_sentence
            found = [t for k in in_sentence for t in keys[k] if t.keep]
            anatomy = {t.term for t in found if t.category == ANATOMY_CATEGORY}
            pathology = {t.term for t in found if t.category == PATHOLOGY_CATEGORY}
            pairs.update((a, p) for a in anatomy for p in pathology)
        for key in in_document:
            for term in keys[key]:
                term.doc_freq += 1
    return dict(pairs)


def build_vocabulary(
    texts: list[str], top_k: int, source: str = "", review: list[Term] | None = None
) -> Vocabulary:
    """A vocabulary of the corpus: the lexicon's proposal for the top K candidates, or the reviewed
    term list `review` (its categories and keep decisions, counted again on this corpus)."""
    documents = analyse(texts)
    terms = propose(documents, top_k) if review is None else review
    cooccurrence = measure(documents, terms)
    return Vocabulary(terms, cooccurrence, len(documents), source, top_k if review is None else None)


# ---- files ----------------------------------------------------------------------------------------

OUTPUT_FILES = ("anatomy.csv", "pathology.csv", "cooccurrence.csv", "review.yaml", "vocab.json")
_REVIEW_HEADER = """\
# medsyn vocabulary review. Edit, then run: medsyn vocab build --review THIS_FILE
#   category: anatomy | pathology | modifier | other (only anatomy and pathology make the lists)
#   keep: false drops a term; move a term by changing its category; add a term as a new line,
#   e.g.  - {term: lingula, category: anatomy}
# count and doc_freq (affirmed mentions, documents) are measured again on the reports when applied.
"""


def vocab_json(vocab: Vocabulary) -> dict:
    """The machine-readable vocabulary read by `medsyn prompts`."""

    def rows(category: str) -> list[dict]:
        return [{"term": t.term, "count": t.count, "doc_freq": t.doc_freq} for t in vocab.kept(category)]

    pairs = sorted(vocab.cooccurrence.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "format": VOCAB_FORMAT,
        "version": VOCAB_VERSION,
        "source": vocab.source,
        "documents": vocab.documents,
        "top_k": vocab.top_k,
        "anatomy": rows(ANATOMY_CATEGORY),
        "pathology": rows(PATHOLOGY_CATEGORY),
        "modifiers": rows(MODIFIER_CATEGORY),
        "cooccurrence": [{"anatomy": a, "pathology": p, "count": n} for (a, p), n in pairs],
    }


def review_yaml(vocab: Vocabulary) -> str:
    """review.yaml: every term with its category and keep flag, one flow mapping a line."""
    import yaml

    lines = [_REVIEW_HEADER, yaml.safe_dump({"reports": vocab.source}, width=10**6).strip(), "terms:"]
    order = {c: i for i, c in enumerate(CATEGORIES)}
    for t in sorted(vocab.terms, key=lambda t: (order.get(t.category, 9), -t.count, t.term)):
        entry = {
            "term": t.term,
            "category": t.category,
            "keep": t.keep,
            "count": t.count,
            "doc_freq": t.doc_freq,
        }
        if t.qualifies:
            entry["qualifies"] = t.qualifies
        lines.append(
            "  - " + yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**6).strip()
        )
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def existing_outputs(out: str | os.PathLike) -> list[Path]:
    """The vocabulary files already in `out`."""
    return [Path(out) / name for name in OUTPUT_FILES if (Path(out) / name).exists()]


def write_vocabulary(out: str | os.PathLike, vocab: Vocabulary) -> None:
    """Write anatomy.csv, pathology.csv, cooccurrence.csv, review.yaml and vocab.json into `out`
    (each file atomically; the caller decides whether existing ones may be replaced)."""
    from medsyn.io import write_json, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    anatomy, pathology = vocab.kept(ANATOMY_CATEGORY), vocab.kept(PATHOLOGY_CATEGORY)
    for name, terms in (("anatomy.csv", anatomy), ("pathology.csv", pathology)):
        write_text(
            out / name,
            _csv_text(["term", "count", "doc_freq"], [[t.term, t.count, t.doc_freq] for t in terms]),
        )
    matrix = [[a.term] + [vocab.cooccurrence.get((a.term, p.term), 0) for p in pathology] for a in anatomy]
    write_text(out / "cooccurrence.csv", _csv_text(["anatomy"] + [p.term for p in pathology], matrix))
    write_text(out / "review.yaml", review_yaml(vocab))
    write_json(out / "vocab.json", vocab_json(vocab))


def read_review(path: str | os.PathLike) -> tuple[list[Term], str]:
    """The reviewed terms of a review.yaml and the reports it was made from ("" if not recorded)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the review ({err})") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise DataError(f"{path}:{line} not valid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(data, dict) or not isinstance(data.get("terms"), list):
        raise DataError(f"{path}: expected a mapping with a 'terms' list (as written by medsyn vocab build)")
    terms: list[Term] = []
    seen: dict[tuple[str, ...], int] = {}
    for n, entry in enumerate(data["terms"], 1):
        where = f"{path}: terms entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("term"), str) or not entry["term"].strip():
            raise DataError(f"{where}: expected a mapping with a non-empty 'term', got {entry!r}")
        term = entry["term"].strip()
        category = entry.get("category")
        if category not in CATEGORIES:
            raise DataError(
                f"{where} ({term!r}): category {category!r}; expected one of {', '.join(CATEGORIES)}"
            )
        keep = entry.get("keep", True)
        if not isinstance(keep, bool):
            raise DataError(f"{where} ({term!r}): keep {keep!r}; expected true or false")
        key = term_key(term)
        if not key:
            raise DataError(f"{where}: term {term!r} has no words")
        if key in seen:
            raise DataError(f"{where}: {term!r} repeats terms entry {seen[key]}; list each term once")
        seen[key] = n
        terms.append(Term(term, category, keep, qualifies=entry.get("qualifies")))
    source = data.get("reports")
    return terms, source if isinstance(source, str) else ""


@dataclass
class PromptVocabulary:
    """What `medsyn prompts` needs: kept anatomy and pathology with counts, and their co-occurrence."""

    anatomy: dict[str, int]
    pathology: dict[str, int]
    cooccurrence: dict[tuple[str, str], int]
    modifiers: list[str] = field(default_factory=list)


def read_vocab(path: str | os.PathLike) -> PromptVocabulary:
    """Read DIR/vocab.json (or the file itself), checking its format."""
    path = Path(path)
    file = path / "vocab.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"{file}: no vocabulary; run `medsyn vocab build --out {path}` first") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: cannot read the vocabulary ({err})") from err
    if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
        raise DataError(f'{file}: not a medsyn vocabulary (expected "format": "{VOCAB_FORMAT}")')
    try:
        anatomy = {r["term"]: int(r["count"]) for r in data["anatomy"]}
        pathology = {r["term"]: int(r["count"]) for r in data["pathology"]}
        modifiers = [r["term"] for r in data.get("modifiers", [])]
        pairs = {(r["anatomy"], r["pathology"]): int(r["count"]) for r in data["cooccurrence"]}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{file}: malformed vocabulary ({type(err).__name__}: {err}); rebuild it") from err
    unknown = [f"{a} / {p}" for a, p in pairs if a not in anatomy or p not in pathology]
    if unknown:
        raise DataError(f"{file}: co-occurrence of terms not in the lists ({unknown[0]}); rebuild it")
    return PromptVocabulary(anatomy, pathology, pairs, modifiers)
