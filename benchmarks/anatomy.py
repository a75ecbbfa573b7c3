"""Do generated samples hold together like the phantoms they learned from? Connectivity of the masks.

For each volume of --samples and of --reference (phantom folders, sample folders or NIfTI: whatever
`medsyn evaluate` reads): per lobe the share of its largest connected piece (26-connectivity), the
fraction of lobe voxels lying in the other lung than their label says (lungs re-segmented from the CT by
the threshold backend), the airway's largest piece share and piece count, the vessels' piece count. The
steering issue's bar for the demo: every lobe's largest piece >= 90%, < 1% wrong side, airway largest
piece >= 80%. The CT measures (%LAA-950 and the rest) come from `medsyn evaluate`.

    python benchmarks/anatomy.py --samples outputs/demo --reference data/demo/heldout

Ends with one JSON line {samples: {...}, reference: {...}} of means over the volumes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage

from medsyn.data.channels import LOBE_NAMES
from medsyn.evaluation.volumes import find_volumes, load_volume

FULL = np.ones((3, 3, 3), bool)
LEFT_LOBES = (1, 2)


def largest_share(mask: np.ndarray) -> tuple[float, int]:
    """(largest connected piece / all voxels, number of pieces) of a binary mask; (nan, 0) when empty."""
    labels, count = ndimage.label(mask, structure=FULL)
    if count == 0:
        return float("nan"), 0
    sizes = np.bincount(labels.ravel())[1:]
    return float(sizes.max() / sizes.sum()), int(count)


def wrong_side(hu: np.ndarray, lobes: np.ndarray) -> float | None:
    """Fraction of lobe voxels inside a CT lung of the other side than their label (None: lungs not found)."""
    from medsyn.data.segment.threshold import ThresholdSegmenter

    seg = ThresholdSegmenter()
    air = (hu < seg.lung_hu) & seg.body(hu)
    left, right = seg.split_left_right(seg.lungs(air & ~seg.airway(hu, air)))
    if not left.any() or not right.any():
        return None
    in_lung = (lobes > 0) & (left | right)
    labelled_left = np.isin(lobes, LEFT_LOBES)
    wrong = in_lung & ((labelled_left & right) | (~labelled_left & left))
    return float(wrong.sum() / max(int(in_lung.sum()), 1))


def volume_row(volume, name: str) -> dict:
    masks = volume.masks
    row: dict = {"id": name}
    if "lobes" in masks:
        lobes = np.asarray(masks["lobes"])
        shares = [largest_share(lobes == k)[0] for k in LOBE_NAMES]
        row["lobe_largest_min"] = float(np.nanmin(shares)) if not np.all(np.isnan(shares)) else float("nan")
        row["lobe_largest_mean"] = float(np.nanmean(shares)) if not np.all(np.isnan(shares)) else float("nan")
        row["wrong_side"] = wrong_side(volume.hu, lobes)
    if "airway" in masks:
        row["airway_largest"], row["airway_pieces"] = largest_share(np.asarray(masks["airway"]) > 0)
    if "vessels" in masks:
        row["vessel_pieces"] = largest_share(np.asarray(masks["vessels"]) > 0)[1]
    return row


def summarise(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r if k != "id"})
    out = {}
    for k in keys:
        values = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
        values = values[np.isfinite(values)]
        out[k] = {"mean": float(values.mean()) if len(values) else None,
                  "min": float(values.min()) if len(values) else None, "n": int(len(values))}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", required=True, help="generated samples (OUT of sample.py)")
    parser.add_argument("--reference", help="phantoms (or any volumes with masks) to compare with")
    args = parser.parse_args()
    result = {}
    for role, path in (("samples", args.samples), ("reference", args.reference)):
        if path is None:
            continue
        rows = [volume_row(load_volume(ref), ref.id) for ref in find_volumes(path)]
        result[role] = summarise(rows)
        print(f"\n{role}: {path} ({len(rows)} volumes)")
        print(f"{'id':<16} {'lobe largest min':>16} {'wrong side %':>12} {'airway largest':>14} "
              f"{'airway pieces':>13} {'vessel pieces':>13}")  # fmt: skip
        for r in rows:
            side = r.get("wrong_side")
            print(f"{str(r['id'])[:16]:<16} {r.get('lobe_largest_min', float('nan')):>16.3f} "
                  f"{'n/a' if side is None else f'{100 * side:.2f}':>12} {r.get('airway_largest', float('nan')):>14.3f} "
                  f"{r.get('airway_pieces', 0):>13} {r.get('vessel_pieces', 0):>13}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    from medsyn.errors import MedsynError

    try:
        main()
    except MedsynError as err:  # bad input: one line, no traceback
        raise SystemExit(f"anatomy.py: error: {err}") from None
