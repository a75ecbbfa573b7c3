"""The pointing game of an align run on phantoms: does a finding's word pick a patch where the finding is?

For a target word of a report (`TARGETS`: a finding or a lobe word, with the spellings the phantom
reports and the prompt templates use), its most similar patch token is its guess; the guess is a hit
when the patch's voxel box overlaps the word's true region (`overlap` rule), and under the stricter
`centre` rule when the patch's centre point lies in the region. Chance is the share of patches that
would be hits, over the patches inside the body and over all patches.

True regions come from the phantom's own drawing (`medsyn.data.phantom.FindingRegions`):
- effusion: the pleural fluid (both sides for a bilateral effusion);
- nodule: every placed lesion, nodules and masses alike (the words do not tell which lesion is meant);
- consolidation: the dense part of every consolidated lobe;
- bullae: every bulla;
- upper / lower: the lobe the word names when the word before it is "left" or "right" ("right upper
  lobe"), else both upper (lower) lobes; lobes as finally labelled (the fluid is no lobe).
A mention whose region is empty is not a case: the phantom lacks the finding, so the mention is a
negation ("No pleural effusion.") or names another structure ("pericardial effusion", `EXCLUDED_BEFORE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage, stats

from medsyn.data.phantom import FindingRegions

# target -> the spellings (lower case) that name it
TARGETS: dict[str, tuple[str, ...]] = {
    "effusion": ("effusion", "effusions"),
    "nodule": ("nodule", "nodules", "mass", "masses", "lesion", "lesions"),
    "consolidation": ("consolidation", "consolidations"),
    "bullae": ("bulla", "bullae", "bullous"),
    "upper": ("upper",),
    "lower": ("lower",),
}
# a mention right after one of these words names something else ("without pericardial effusion")
EXCLUDED_BEFORE: dict[str, tuple[str, ...]] = {"effusion": ("pericardial",)}
LOBES: dict[str, dict[str, int]] = {"upper": {"left": 1, "right": 3}, "lower": {"left": 2, "right": 5}}
RULES = ("overlap", "centre")
BODY_HU = -500.0  # body: voxels denser than this, with the lungs and airway they enclose in each axial slice
BODY_SHARE = 0.5  # a patch is inside the body when at least this share of its voxels is


def target_of(word: str) -> str | None:
    """The target a report word names (`TARGETS`), or None."""
    word = word.lower()
    return next((target for target, spellings in TARGETS.items() if word in spellings), None)


def target_masks(regions: FindingRegions, lobes: np.ndarray) -> dict[str, np.ndarray]:
    """The masks the targets point at, on the phantom's grid (S, S, S): effusion, nodule, consolidation,
    bullae (bool) and lobes (uint8 labels 0..5)."""
    return {
        "effusion": regions.effusion.astype(bool),
        "nodule": regions.lesions > 0,
        "consolidation": regions.consolidation.astype(bool),
        "bullae": regions.bullae.astype(bool),
        "lobes": np.asarray(lobes, np.uint8),
    }


def word_region(
    words: Sequence[str], position: int, masks: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, str]:
    """The true region (bool, the masks' shape) of `words[position]` and what it is ("effusion",
    "left upper lobe", "upper lobes (side not given)"); empty for a word that names no present finding."""
    target = target_of(words[position])
    shape = masks["lobes"].shape
    if target is None:
        return np.zeros(shape, bool), ""
    before = words[position - 1].lower() if position > 0 else ""
    if before in EXCLUDED_BEFORE.get(target, ()):
        return np.zeros(shape, bool), f"{before} {target}"
    if target in LOBES:
        if before in LOBES[target]:
            return masks["lobes"] == LOBES[target][before], f"{before} {target} lobe"
        return np.isin(masks["lobes"], list(LOBES[target].values())), f"{target} lobes (side not given)"
    return np.asarray(masks[target], bool), target


def _blocks(mask: np.ndarray, grid: Sequence[int], stride: int) -> np.ndarray:
    """(I, J, K) voxels -> (gi, s, gj, s, gk, s): the voxels of each patch (cropped or padded with False
    to the patch grid's extent)."""
    full = np.zeros([g * stride for g in grid], mask.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(mask.shape, full.shape, strict=True))
    full[common] = mask[common]
    return full.reshape([n for g in grid for n in (g, stride)])


def patch_hits(region: np.ndarray, grid: Sequence[int], stride: int) -> dict[str, np.ndarray]:
    """Which patches would be hits on `region` (bool, voxels of the grid the patches tile), per rule,
    each (prod(grid),) bool in patch-token order: `overlap`, the patch's box [stride * p, stride * (p + 1))
    holds a region voxel; `centre`, the box's centre point lies in the region, read as the union of its
    closed voxel cubes (the one central voxel for an odd stride, any of the 2^n around it for an even one).
    """
    blocks = _blocks(np.asarray(region, bool), grid, stride)
    inner = tuple(range(1, 2 * len(grid), 2))
    middle = slice((stride - 1) // 2, stride // 2 + 1)
    centre = blocks[tuple(middle if axis in inner else slice(None) for axis in range(blocks.ndim))]
    return {"overlap": blocks.any(inner).ravel(), "centre": centre.any(inner).ravel()}


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body (bool, hu's shape (I, J, K), RAS): voxels above `BODY_HU` with what they enclose in each
    axial (k) slice, so the lungs and airway count as body and the air around it does not."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(np.asarray(hu) > BODY_HU, in_plane)


def body_patches(body: np.ndarray, grid: Sequence[int], stride: int) -> np.ndarray:
    """(prod(grid),) bool: the patches with at least `BODY_SHARE` of their voxels in `body`."""
    blocks = _blocks(np.asarray(body, bool), grid, stride)
    return (blocks.mean(tuple(range(1, 2 * len(grid), 2))) >= BODY_SHARE).ravel()


@dataclass
class PointingCase:
    """One target word of one report: its region, its best patch and whether that was a hit, and the
    chance of a hit for a random patch (inside the body, and of all patches), per rule."""

    subject: str
    target: str
    word: str  # as written in the report
    position: int  # in the report's words
    region: str  # what the region is (`word_region`)
    region_voxels: int
    patch: int  # token index of the most similar patch
    similarity: float
    hit: dict[str, bool]  # rule -> hit
    chance_body: dict[str, float]  # rule -> share of body patches that are hits
    chance_all: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def point(
    similarity: np.ndarray, region: np.ndarray, body: np.ndarray, grid: Sequence[int], stride: int
) -> tuple[int, dict[str, bool], dict[str, float], dict[str, float]]:
    """Play one case: a word's similarity with every patch (P,), its region and the body (bool voxels of
    the grid the patches tile, patch p covering [stride * p, stride * (p + 1)) per axis) -> the chosen
    patch, its hit per rule, and chance per rule over the body's patches and over all patches."""
    chosen = int(np.argmax(similarity))
    hits = patch_hits(region, grid, stride)
    inside = body_patches(body, grid, stride)
    chance_body = {
        rule: float(h[inside].mean()) if inside.any() else float("nan") for rule, h in hits.items()
    }
    chance_all = {rule: float(h.mean()) for rule, h in hits.items()}
    return chosen, {rule: bool(h[chosen]) for rule, h in hits.items()}, chance_body, chance_all


def one_sided_p(hits: int, cases: int, chance: float) -> float | None:
    """P(X >= hits) for X ~ Binomial(cases, chance): the one-sided binomial test of accuracy > chance."""
    if cases == 0 or not np.isfinite(chance):
        return None
    return float(stats.binomtest(hits, cases, min(max(chance, 0.0), 1.0), alternative="greater").pvalue)


def summarise(cases: Sequence[PointingCase], absent: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Per target (all of `TARGETS`, those without cases too): cases, subjects, absent mentions and, per
    rule, hits, accuracy, the chance baselines (the mean over cases of each case's chance) and the
    one-sided binomial p-values of accuracy > baseline (`p_body`, `p_all`)."""
    absent = absent or {}
    out = {}
    for target in TARGETS:
        mine = [c for c in cases if c.target == target]
        entry: dict = {"cases": len(mine), "subjects": len({c.subject for c in mine}),
                       "absent_mentions": int(absent.get(target, 0))}  # fmt: skip
        for rule in RULES:
            hits = sum(c.hit[rule] for c in mine)
            body_chances = [c.chance_body[rule] for c in mine if np.isfinite(c.chance_body[rule])]
            body = float(np.mean(body_chances)) if body_chances else float("nan")
            every = float(np.mean([c.chance_all[rule] for c in mine])) if mine else float("nan")
            entry[rule] = {
                "hits": int(hits),
                "accuracy": hits / len(mine) if mine else None,
                "baseline_body": body if body_chances else None,
                "baseline_all": every if mine else None,
                "p_body": one_sided_p(hits, len(mine), body),
                "p_all": one_sided_p(hits, len(mine), every),
            }
        out[target] = entry
    return out
