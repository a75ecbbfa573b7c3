"""Lobe labels through the diffusion channel and back: how often a lobe voxel returns as a lobe it does
not even touch, per encoding and decoding.

Phantoms go through encode -> smooth borders (a Gaussian blur of `--blur` voxels, as a network's output
has) -> Gaussian noise (`--sigmas`, in the diffusion range) -> decode, for
  old           label / 5 mapped to [-1, 1], rounded (medsyn-1; reimplemented here as the baseline)
  levels        `LOBE_LEVELS` (medsyn-2), the nearest level
  levels+lungs  the same, decoded with the lungs in mind (`decode_lobes_clean`; what sample.py writes)
  bits          three analog bits (`lobe_encoding: bits`), the nearest valid code
  bits+lungs    the same, then with the lungs in mind (what sample.py writes for a bits run)
Measures, as fractions of the true lobe voxels: wrong (decoded as a lobe that is neither the true one nor
adjacent to it; adjacent: 1-2, 3-4, 4-5, 3-5), lost (decoded as background), side (a lobe of the other
lung; part of wrong) and spurious (background decoded as a lobe); per lobe, its 6-connected pieces and
its largest piece's share of its voxels.

With --samples DIR (folders of generated samples holding lobes.nii.gz and ct.nii.gz) the truth is
unknown; measured instead: lobe voxels on the wrong side (left lobes in the right lung and vice versa),
with the lungs taken from the lobe map's own components (`medsyn.data.lobes.right_lung`) and from the
CT (the threshold segmenter's lungs, when it finds two), pieces per lobe and the largest piece's share.

    python benchmarks/lobe_labels.py [--n 8] [--sizes 64 128] [--sigmas 0.05 0.15] [--blur 1.0]
    python benchmarks/lobe_labels.py --samples OUT_DIR [--n 0]

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from medsyn.data.channels import (
    NUM_LOBE_LABELS,
    decode_lobe_bits,
    decode_lobes,
    decode_lobes_clean,
    encode_lobe_bits,
    encode_lobes,
)
from medsyn.data.lobes import LEFT_LOBES, RIGHT_LOBES, right_lung
from medsyn.data.nifti import load_nifti

ADJACENT = {(1, 2), (3, 4), (4, 5), (3, 5)}  # lobes that share a fissure
CONN = ndimage.generate_binary_structure(3, 1)


def old_encode(labels: np.ndarray) -> np.ndarray:
    """medsyn-1: label / 5 mapped to [-1, 1]."""
    return labels * (2.0 / NUM_LOBE_LABELS) - 1.0


def old_decode(x: np.ndarray) -> np.ndarray:
    """medsyn-1: the nearest label by rounding."""
    return np.clip(np.round((x + 1.0) * (NUM_LOBE_LABELS / 2.0)), 0, NUM_LOBE_LABELS)


# name -> (labels (*S) -> channels (C, *S) in the diffusion range, channels -> labels)
METHODS: dict[str, tuple[Callable, Callable]] = {
    "old": (lambda lab: old_encode(lab)[None], lambda x: old_decode(x[0])),
    "levels": (lambda lab: encode_lobes(lab)[None], lambda x: decode_lobes(x[0])),
    "levels+lungs": (lambda lab: encode_lobes(lab)[None], lambda x: decode_lobes_clean(x[0])),
    "bits": (encode_lobe_bits, decode_lobe_bits),
    "bits+lungs": (encode_lobe_bits, lambda x: decode_lobes_clean(encode_lobes(decode_lobe_bits(x)))),
}


def corrupt(x: np.ndarray, sigma: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth borders (a Gaussian blur of `blur` voxels per channel), then Gaussian noise of `sigma`."""
    smooth = np.stack([ndimage.gaussian_filter(c.astype(np.float32), blur) if blur > 0 else c for c in x])
    return (smooth + rng.normal(0.0, sigma, x.shape)).astype(np.float32)


def tolerated(truth: np.ndarray) -> np.ndarray:
    """(6, 6) bool: decoding true label i as j is no error (the same lobe, or one adjacent to it)."""
    ok = np.eye(NUM_LOBE_LABELS + 1, dtype=bool)
    for a, b in ADJACENT:
        ok[a, b] = ok[b, a] = True
    return ok[truth]


def pieces(labels: np.ndarray) -> tuple[list[int], list[float]]:
    """Per lobe present: its 6-connected pieces and its largest piece's share of its voxels."""
    counts, shares = [], []
    for k in range(1, NUM_LOBE_LABELS + 1):
        comp, n = ndimage.label(labels == k, CONN)
        if n:
            sizes = np.bincount(comp.ravel())[1:]
            counts.append(int(n))
            shares.append(float(sizes.max() / sizes.sum()))
    return counts, shares


def wrong_side(labels: np.ndarray, right: np.ndarray) -> int:
    """Lobe voxels whose lobe belongs to the other lung than the one `right` (True: right lung) says."""
    return int((np.isin(labels, LEFT_LOBES) & right).sum() + (np.isin(labels, RIGHT_LOBES) & ~right).sum())


def score(decoded: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Counts (voxels) of one decoded phantom against its truth, to be pooled."""
    lobe = truth > 0
    got = decoded[lobe].astype(np.int64)
    ok = np.take_along_axis(tolerated(truth[lobe].astype(np.int64)), got[:, None], 1)[:, 0]
    counts, shares = pieces(decoded)
    return {
        "lobe_voxels": int(lobe.sum()),
        "wrong": int(((got > 0) & ~ok).sum()),
        "lost": int((got == 0).sum()),
        "side": wrong_side(decoded[lobe], np.isin(truth[lobe], RIGHT_LOBES)),
        "spurious": int((decoded[~lobe] > 0).sum()),
        "pieces": float(np.mean(counts)) if counts else 0.0,
        "largest": float(np.mean(shares)) if shares else 0.0,
    }


def phantom_rows(n: int, sizes: list[int], sigmas: list[float], blur: float, seed: int) -> list[dict]:
    """One row per (size, sigma, method): pooled fractions, mean pieces and largest shares, seconds."""
    from medsyn.data.phantom import generate_phantom

    rows = []
    for size in sizes:
        truths = [generate_phantom(size=size, seed=seed + i).lobes for i in range(n)]
        exact = [score(t, t) for t in truths]
        rows.append(_row(size, 0.0, "truth", exact, 0.0))
        for sigma in sigmas:
            for name, (encode, decode) in METHODS.items():
                scores, seconds = [], 0.0
                for i, truth in enumerate(truths):
                    rng = np.random.default_rng((seed + i, size, int(sigma * 1000)))
                    x = corrupt(np.asarray(encode(truth), np.float32), sigma, blur, rng)
                    began = time.perf_counter()
                    decoded = np.asarray(decode(x)).astype(np.uint8)
                    seconds += time.perf_counter() - began
                    scores.append(score(decoded, truth))
                rows.append(_row(size, sigma, name, scores, seconds / n))
    return rows


def _row(size: int, sigma: float, method: str, scores: list[dict], seconds: float) -> dict:
    total = sum(s["lobe_voxels"] for s in scores)
    row = {"size": size, "sigma": sigma, "method": method}
    row.update({k: sum(s[k] for s in scores) / total for k in ("wrong", "lost", "side", "spurious")})
    row.update({k: float(np.mean([s[k] for s in scores])) for k in ("pieces", "largest")})
    row["seconds"] = seconds
    return row


def ct_lungs(ct: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(left, right) lungs of a CT (HU, RAS) by the threshold segmenter, or None when it finds no two."""
    from medsyn.data.segment.threshold import ThresholdSegmenter

    seg = ThresholdSegmenter()
    air = (ct < seg.lung_hu) & seg.body(ct)
    left, right = seg.split_left_right(seg.lungs(air & ~seg.airway(ct, air)))
    return (left, right) if left.any() and right.any() else None


def sample_rows(root: Path) -> list[dict]:
    """One row per generated sample folder under `root` (those holding lobes.nii.gz)."""
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "lobes.nii.gz").is_file()):
        labels = load_nifti(folder / "lobes.nii.gz", dtype=np.uint8)[0]
        lobe = labels > 0
        side = wrong_side(labels[lobe], right_lung(labels, lobe)[lobe]) / max(int(lobe.sum()), 1)
        found = ct_lungs(load_nifti(folder / "ct.nii.gz")[0]) if (folder / "ct.nii.gz").is_file() else None
        side_ct = None
        if found is not None:
            in_ct = lobe & (found[0] | found[1])
            side_ct = wrong_side(labels[in_ct], found[1][in_ct]) / max(int(in_ct.sum()), 1)
        counts, shares = pieces(labels)
        rows.append({"sample": folder.name, "lobe_voxels": int(lobe.sum()), "side": side, "side_ct": side_ct,
                     "pieces": float(np.mean(counts)) if counts else 0.0,
                     "largest": float(np.mean(shares)) if shares else 0.0})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="phantoms per size (0: none)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--blur", type=float, default=1.0, help="Gaussian blur (voxels) before the noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, help="a folder of generated samples (OUT of sample.py)")
    args = parser.parse_args()
    result: dict = {}
    if args.n > 0:
        rows = phantom_rows(args.n, args.sizes, args.sigmas, args.blur, args.seed)
        print(f"{args.n} phantoms per size, blur {args.blur:g} voxel(s); % of the true lobe voxels")
        print(f"{'size':>4} {'sigma':>5} {'method':<13} {'wrong':>7} {'lost':>7} {'side':>7} {'spurious':>8} "
              f"{'pieces':>6} {'largest':>7} {'s/vol':>6}")  # fmt: skip
        for r in rows:
            print(f"{r['size']:>4} {r['sigma']:>5.2f} {r['method']:<13} {100 * r['wrong']:>7.3f} "
                  f"{100 * r['lost']:>7.3f} {100 * r['side']:>7.3f} {100 * r['spurious']:>8.3f} "
                  f"{r['pieces']:>6.1f} {r['largest']:>7.3f} {r['seconds']:>6.2f}")  # fmt: skip
        result["phantoms"] = rows
    if args.samples is not None:
        rows = sample_rows(args.samples)
        print(f"\n{len(rows)} generated samples in {args.samples}: lobe voxels on the wrong side (%), by the "
              "lobe map's lungs and by the CT's; pieces per lobe; largest piece share")  # fmt: skip
        print(f"  {'sample':>6} {'side':>7} {'side_ct':>7} {'pieces':>6} {'largest':>7}")
        for r in rows:
            side_ct = "n/a" if r["side_ct"] is None else f"{100 * r['side_ct']:.3f}"
            print(f"  {r['sample']:>6} {100 * r['side']:>7.3f} {side_ct:>7} {r['pieces']:>6.1f} "
                  f"{r['largest']:>7.3f}")  # fmt: skip
        result["samples"] = rows
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
