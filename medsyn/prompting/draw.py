"""Draw the anatomy and pathology terms of one prompt (paper section 2.1, "Prompts generation").

Anatomy terms are drawn without replacement, weighted by how often they co-occur with any pathology
(by their count when no pathology is asked for); pathology terms are then drawn only among those that
co-occur with a drawn anatomy term, weighted by the summed co-occurrence counts. So every pathology in a
prompt sits with an anatomy term the reports put it with. Two terms of a prompt never nest ("effusion"
and "pleural effusion"): the text could not tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsyn.errors import ConfigError
from medsyn.prompting.text import term_key
from medsyn.prompting.vocab import PromptVocabulary

MAX_TRIES = 200


@dataclass(frozen=True)
class Draw:
    """The terms of one prompt, and for each pathology the drawn anatomy term it is placed at."""

    anatomy: tuple[str, ...]
    pathology: tuple[str, ...]
    sites: tuple[str, ...]  # sites[i]: the anatomy term of pathology[i]


def _nested(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when one key is a contiguous part of the other ("effusion" in "pleural effusion")."""
    short, long = sorted((a, b), key=len)
    return any(long[i : i + len(short)] == short for i in range(len(long) - len(short) + 1))


def _choice(rng: np.random.Generator, items: list[str], weights: list[float], k: int) -> list[str] | None:
    """`k` items drawn one by one with probability proportional to `weights`, never two where one
    contains the other (no "effusion" beside "pleural effusion"); None when too few are left."""
    keys = {item: term_key(item) for item in items}
    pool = [(item, float(w)) for item, w in zip(items, weights, strict=True) if w > 0]
    chosen: list[str] = []
    while len(chosen) < k:
        if not pool:
            return None
        w = np.array([w for _, w in pool])
        item = pool[int(rng.choice(len(pool), p=w / w.sum()))][0]
        chosen.append(item)
        pool = [(i, w) for i, w in pool if not _nested(keys[i], keys[item])]
    return chosen


def check_counts(vocab: PromptVocabulary, n_anatomy: int, n_pathology: int) -> None:
    """Refuse numbers of terms that the vocabulary cannot give."""
    if n_anatomy < 0 or n_pathology < 0 or n_anatomy + n_pathology == 0:
        raise ConfigError(
            f"--anatomy {n_anatomy} --pathology {n_pathology}: expected counts >= 0, not both 0"
        )
    if n_pathology and not n_anatomy:
        raise ConfigError(
            f"--pathology {n_pathology} needs --anatomy >= 1: a pathology is placed at an anatomy term"
        )
    linked = {a for (a, _), c in vocab.cooccurrence.items() if c > 0}
    pool = len(linked) if n_pathology else sum(c > 0 for c in vocab.anatomy.values())
    if n_anatomy > pool:
        raise ConfigError(f"--anatomy {n_anatomy}: the vocabulary has {pool} anatomy terms to draw from"
                          + (" (co-occurring with a pathology)" if n_pathology else ""))  # fmt: skip
    linked_p = {p for (_, p), c in vocab.cooccurrence.items() if c > 0}
    if n_pathology > len(linked_p):
        raise ConfigError(f"--pathology {n_pathology}: the vocabulary has {len(linked_p)} pathology terms "
                          f"that co-occur with an anatomy term")  # fmt: skip


def draw_terms(vocab: PromptVocabulary, n_anatomy: int, n_pathology: int, rng: np.random.Generator) -> Draw:
    """Draw `n_anatomy` anatomy and `n_pathology` co-occurring pathology terms (see the module doc)."""
    anatomy_terms = list(vocab.anatomy)
    if n_pathology:
        weight = {a: 0 for a in anatomy_terms}
        for (a, _), c in vocab.cooccurrence.items():
            weight[a] += c
    else:
        weight = dict(vocab.anatomy)
    pool = [a for a in anatomy_terms if weight[a] > 0]
    for _ in range(MAX_TRIES):
        anatomy = _choice(rng, pool, [weight[a] for a in pool], n_anatomy)
        if anatomy is None:
            continue
        mass = {p: sum(vocab.cooccurrence.get((a, p), 0) for a in anatomy) for p in vocab.pathology}
        pathology = _choice(rng, list(vocab.pathology), list(mass.values()), n_pathology)
        if pathology is None:
            continue
        sites = []
        for p in pathology:
            options = [a for a in anatomy if vocab.cooccurrence.get((a, p), 0) > 0]
            sites.append(_choice(rng, options, [vocab.cooccurrence[(a, p)] for a in options], 1)[0])
        return Draw(tuple(anatomy), tuple(pathology), tuple(sites))
    raise ConfigError(f"--anatomy {n_anatomy} --pathology {n_pathology}: no draw of {n_anatomy} anatomy terms "
                      f"co-occurs with {n_pathology} pathology terms in {MAX_TRIES} tries; ask for fewer")  # fmt: skip
