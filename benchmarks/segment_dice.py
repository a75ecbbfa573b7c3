"""Dice of a segmentation backend against the phantoms' true masks, per structure.

Structures: lungs (lobes > 0), each lobe 1..5, airway, vessels. The backend sees only the CT (HU, RAS).

    python benchmarks/segment_dice.py --n 8 --size 128 --spacing-mm 2.0 [--backend threshold]
    python benchmarks/segment_dice.py --input PHANTOM_DIR/manifest.csv
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from medsyn.data.channels import LOBE_NAMES
from medsyn.data.nifti import load_nifti
from medsyn.data.readers import read_manifest
from medsyn.data.segment import dice, get_backend

STRUCTURES = ("lungs", *(f"lobe {i} ({name})" for i, name in LOBE_NAMES.items()), "airway", "vessels")


def subject_dice(predicted: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Dice per structure for one subject."""
    scores = {"lungs": dice(predicted["lobes"] > 0, truth["lobes"] > 0)}
    for i, name in LOBE_NAMES.items():
        scores[f"lobe {i} ({name})"] = dice(predicted["lobes"] == i, truth["lobes"] == i)
    scores["airway"] = dice(predicted["airway"], truth["airway"])
    scores["vessels"] = dice(predicted["vessels"], truth["vessels"])
    return scores


def evaluate(
    manifest: Path, backend_name: str = "threshold", limit: int | None = None
) -> list[dict[str, float]]:
    """Run the backend on every subject of a phantom manifest (masks given) and score it."""
    backend = get_backend(backend_name)
    results = []
    for subject in read_manifest(manifest)[:limit]:
        hu, affine = load_nifti(subject.ct)
        truth = {name: load_nifti(path, dtype=np.uint8)[0] for name, path in subject.masks.items()}
        start = time.perf_counter()
        predicted = backend(hu, affine)
        scores = subject_dice(predicted, truth)
        print(f"{subject.id}: " + ", ".join(f"{k.split(' (')[0]} {v:.3f}" for k, v in scores.items())
              + f"  [{time.perf_counter() - start:.1f} s]")  # fmt: skip
        results.append(scores)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", type=Path, help="an existing phantom manifest.csv (else phantoms are made)"
    )
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing-mm", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="threshold")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.input
        if manifest is None:
            from medsyn.data.phantom import write_dataset

            write_dataset(Path(tmp), n=args.n, size=args.size, spacing_mm=args.spacing_mm, seed=args.seed)
            manifest = Path(tmp) / "manifest.csv"
        results = evaluate(manifest, args.backend)
    print(f"\n{args.backend} backend, {len(results)} phantoms: Dice mean (sd, min)")
    for name in STRUCTURES:
        values = np.array([r[name] for r in results])
        print(f"  {name:24s} {values.mean():.3f} ({values.std():.3f}, {values.min():.3f})")


if __name__ == "__main__":
    main()
