"""Can the controllability measures see each finding on this grid? The same test on real phantoms.

`medsyn controllability` asks whether a model's samples move in the prompted direction; this asks whether
the instrument could tell at all: it measures the real phantoms of a prepared cache on its base (`lr`) or
full (`hr`) grid with `measure_volume`, groups them by their ground truth (truth.json) as the default pairs
group their prompts, and runs the same one-tailed Welch test on random draws of N subjects per side.
Reported per pair and measure: both groups' mean +- sd, p over the whole groups, and the share of draws
of N per side reaching p < 0.01 (the power a perfect model would have at that N). A pair whose power is
low on real phantoms cannot pass on samples either: the grid, not the model, is the limit.

    python benchmarks/instrument_ceiling.py --cache data/phantom/cache --phantoms data/phantom/phantoms [--isolated]

--isolated keeps only subjects with no other finding than the pair's, as its two prompts are normal but
for one sentence (fewer subjects, less spread from the other findings).

Measures are cached per volume under --work, so a second run only redoes the statistics. Ends with one
JSON line {pair/measure: {p, power, n_a, n_b}}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm

from medsyn.evaluation.controllability import ALPHA, DERIVED_MEASURES
from medsyn.evaluation.measures import measure_volume
from medsyn.evaluation.volumes import find_volumes, load_volume

RIGHT_UPPER = 3

Group = Callable[[dict], bool]


def _findings(t: dict) -> dict:
    return t["findings"]


def _rul_lesions(t: dict) -> list[dict]:
    return [lesion for lesion in t.get("lesions") or [] if int(lesion.get("lobe", 0)) == RIGHT_UPPER]


def _clear_except(t: dict, finding: str) -> bool:
    """No finding other than `finding` (effusion, cardiomegaly, emphysema, lesions, airspace): the
    contrast of two prompts that are normal but for one sentence."""
    f = _findings(t)
    clear = {
        "effusion": f["effusion"] == "none",
        "cardiomegaly": not f["cardiomegaly"],
        "emphysema": not f["bullae"] and f["emphysema_lobe"] is None,
        "lesions": not t.get("lesions"),
        "airspace": not f["consolidation"] and not f["ground_glass"],
    }
    return all(ok for name, ok in clear.items() if name != finding)


# the finding each pair varies (the others are held normal under --isolated)
VARIED = {"pleural_effusion": "effusion", "cardiomegaly": "cardiomegaly", "bullous_emphysema": "emphysema",
          "effusion_side": "effusion", "nodule_right_upper": "lesions"}  # fmt: skip


# (pair, measure, direction, group A, group B): the default pairs' contrasts in ground-truth terms
CONTRASTS: tuple[tuple[str, str, str, Group, Group], ...] = (
    ("pleural_effusion", "effusion_ml", "greater",
     lambda t: _findings(t)["effusion"] == "none", lambda t: _findings(t)["effusion"] == "large"),
    ("cardiomegaly", "ctr", "greater",
     lambda t: not _findings(t)["cardiomegaly"], lambda t: bool(_findings(t)["cardiomegaly"])),
    ("bullous_emphysema", "laa950_pct", "greater",
     lambda t: not _findings(t)["bullae"] and _findings(t)["emphysema_lobe"] is None,
     lambda t: bool(_findings(t)["bullae"])),
    ("effusion_side", "effusion_left_ml", "less",
     lambda t: _findings(t)["effusion"] == "large" and _findings(t)["effusion_side"] == "left",
     lambda t: _findings(t)["effusion"] == "large" and _findings(t)["effusion_side"] == "right"),
    ("effusion_side", "effusion_right_ml", "greater",
     lambda t: _findings(t)["effusion"] == "large" and _findings(t)["effusion_side"] == "left",
     lambda t: _findings(t)["effusion"] == "large" and _findings(t)["effusion_side"] == "right"),
    ("nodule_right_upper", "nodule_count_right_upper", "greater",
     lambda t: not _rul_lesions(t),
     lambda t: any(lesion["kind"] == "nodule" and 15 <= lesion["size_mm"] <= 25 for lesion in _rul_lesions(t))),
)  # fmt: skip


def value(measures: dict, key: str) -> float:
    if key in DERIVED_MEASURES:
        return float(DERIVED_MEASURES[key](measures) or 0.0)
    return float(measures[key])


def welch(a: np.ndarray, b: np.ndarray, direction: str) -> float:
    """One-tailed Welch p that b moves from a in `direction`; 1 when both are constant and equal."""
    if a.std() == 0 and b.std() == 0:
        return 1.0 if (b.mean() <= a.mean()) == (direction == "greater") else 0.0
    return float(stats.ttest_ind(b, a, equal_var=False, alternative=direction).pvalue)


def measure_all(cache: Path, phantoms: Path, grid: str, work: Path, limit: int | None) -> list[dict]:
    refs = find_volumes(cache / "manifest.csv", None, grid=grid)[:limit]
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for ref in tqdm(refs, desc=f"measuring {grid}", unit="vol"):
        truth_file = phantoms / ref.id / "truth.json"
        if not truth_file.is_file():
            continue
        saved = work / f"{ref.id}.json"
        if saved.is_file():
            measures = json.loads(saved.read_text())
        else:
            volume = load_volume(ref)
            measures = measure_volume(volume.hu, volume.affine, volume.masks)
            tmp = saved.with_suffix(".tmp")
            tmp.write_text(json.dumps(measures))
            tmp.replace(saved)
        rows.append({"truth": json.loads(truth_file.read_text()), "measures": measures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path("data/phantom/cache"))
    parser.add_argument("--phantoms", type=Path, default=Path("data/phantom/phantoms"))
    parser.add_argument("--grid", choices=("lr", "hr"), default="lr")
    parser.add_argument(
        "--n", type=int, default=16, help="subjects per side in a draw (as controllability's N)"
    )
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None, help="measure only the first LIMIT subjects")
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="only subjects without any other finding than the pair's (as its prompts)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="measure cache (default outputs/instrument/GRID)"
    )
    args = parser.parse_args()
    rows = measure_all(args.cache, args.phantoms, args.grid, args.work or Path(f"outputs/instrument/{args.grid}"),
                       args.limit)  # fmt: skip
    rng = np.random.default_rng(0)
    summary = {}
    print(f"{len(rows)} phantoms on the {args.grid} grid; power = share of {args.draws} draws of N = {args.n} "
          f"per side with p < {ALPHA}")  # fmt: skip
    print("| pair | measure | A mean ± sd (n) | B mean ± sd (n) | p (all) | power at N |")
    print("|---|---|---|---|---|---|")
    for pair, key, direction, in_a, in_b in CONTRASTS:
        kept = [r for r in rows if not args.isolated or _clear_except(r["truth"], VARIED[pair])]
        a = np.array([value(r["measures"], key) for r in kept if in_a(r["truth"])])
        b = np.array([value(r["measures"], key) for r in kept if in_b(r["truth"])])
        if len(a) < 2 or len(b) < 2:
            print(f"| {pair} | {key} | too few subjects ({len(a)}, {len(b)}) | | | |")
            continue
        n = min(args.n, len(a), len(b))
        hits = [
            welch(rng.choice(a, n, replace=False), rng.choice(b, n, replace=False), direction) < ALPHA
            for _ in range(args.draws)
        ]
        p_all, power = welch(a, b, direction), float(np.mean(hits))
        summary[f"{pair}/{key}"] = {"p": p_all, "power": power, "n_a": len(a), "n_b": len(b), "n": n}
        print(f"| {pair} | {key} | {a.mean():.3g} ± {a.std():.3g} ({len(a)}) | {b.mean():.3g} ± {b.std():.3g} "
              f"({len(b)}) | {p_all:.2g} | {power:.2f} |")  # fmt: skip
    print(json.dumps({"grid": args.grid, "n": args.n, "isolated": args.isolated, "pairs": summary}))


if __name__ == "__main__":
    main()
