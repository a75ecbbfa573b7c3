"""How much faster is reading a cached subject than decoding its NIfTI files?

Builds N subjects (phantoms when `medsyn.data.phantom.write_dataset` exists, else synthetic chests),
prepares them into a cache with `medsyn.data.prepare` (masks given, so no segmentation), then times
  - NIfTI: load ct/lobes/airway/vessels .nii.gz and encode them into the (4, S, S, S) float32 stack;
  - cache: load hr.npy (memory-mapped) into the same float32 stack; also lr.npy and one SR crop.
Both read warm files (the OS page cache holds both), so the ratio is decoding cost, not disk speed.

    python benchmarks/data_loading.py --n 20 --size 128
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from medsyn.data import cache
from medsyn.data.channels import encode_volume
from medsyn.data.datamodule import upsampled_crop
from medsyn.data.nifti import load_nifti, save_nifti, spacing_affine
from medsyn.data.prepare import PrepareOptions, prepare
from medsyn.data.preprocess import PreprocessConfig

CHANNEL_FILES = ("ct", "lobes", "airway", "vessels")


def synthetic_dataset(out: Path, n: int, size: int) -> Path:
    """Fallback inputs: noisy ellipsoid chests with masks, written as a generic manifest."""
    x, y, z = (np.indices((size,) * 3, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    left = ((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.7) ** 2 <= 1
    right = ((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.7) ** 2 <= 1
    airway = (x**2 + y**2 <= 0.01) & (z > 0.2)
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, body.shape)
        hu[left | right] = -850.0 + rng.normal(0, 30, int((left | right).sum()))
        hu[airway] = -1000.0
        vessels = (left | right) & (rng.random(body.shape) < 0.03)
        hu[vessels] = 40.0
        masks = {"ct": np.rint(hu).astype(np.int16), "lobes": (left * 1 + right * 3).astype(np.uint8),
                 "airway": airway.astype(np.uint8), "vessels": vessels.astype(np.uint8)}  # fmt: skip
        sid = f"syn{i:03d}"
        for name, array in masks.items():
            save_nifti(out / sid / f"{name}.nii.gz", array, spacing_affine(1.0, array.shape))
        rows.append({"id": sid, **{c: f"{sid}/{c}.nii.gz" for c in CHANNEL_FILES}, "findings": "Synthetic.",
                     "impression": "Synthetic."})  # fmt: skip
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", *CHANNEL_FILES, "findings", "impression"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


def make_inputs(out: Path, n: int, size: int) -> tuple[Path, str]:
    try:
        from medsyn.data.phantom import write_dataset
    except ImportError:
        return synthetic_dataset(out, n, size), "synthetic chests"
    write_dataset(out, n=n, size=size, spacing_mm=256.0 / size, seed=0)
    return out / "manifest.csv", "phantoms"


def timed(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest, kind = make_inputs(tmp / "inputs", args.n, args.size)
        spacing = load_nifti(next((tmp / "inputs").rglob("ct.nii.gz")))[1][0, 0]
        options = PrepareOptions(preprocess=PreprocessConfig(size=args.size, spacing_mm=float(abs(spacing))),
                                 progress=False)  # fmt: skip
        result = prepare(manifest, tmp / "cache", options)
        print(f"{args.n} {kind} at {args.size}^3: inputs + prepare took {time.perf_counter() - t0:.1f} s "
              f"({len(result.done)} prepared, {len(result.failed)} failed)")  # fmt: skip
        rows = cache.read_cache_manifest(tmp / "cache")
        inputs = {r["id"]: r for r in csv.DictReader(open(manifest))}

        def decode_nifti(row: dict) -> np.ndarray:
            folder = manifest.parent
            volumes = {c: load_nifti(folder / inputs[row["id"]][c])[0] for c in CHANNEL_FILES}
            return encode_volume(volumes)

        def read_hr(row: dict) -> np.ndarray:
            return np.asarray(cache.load_array(row["hr"]), dtype=np.float32)

        def read_hr16(row: dict) -> np.ndarray:
            return np.array(cache.load_array(row["hr"]))  # as stored, float16: the read without conversion

        def read_lr(row: dict) -> np.ndarray:
            return np.asarray(cache.load_array(row["lr"]), dtype=np.float32)

        def read_crop(row: dict) -> np.ndarray:
            hr, lr, c = cache.load_array(row["hr"]), cache.load_array(row["lr"]), min(args.crop, args.size)
            crop = np.asarray(hr[:, 5 : 5 + c, 7 : 7 + c, 3 : 3 + c], dtype=np.float32)
            return crop, upsampled_crop(lr, (5, 7, 3), c, args.size // lr.shape[1])

        times = {name: min(timed(fn, rows) for _ in range(args.repeats)) for name, fn in
                 [("nifti", decode_nifti), ("hr", read_hr), ("hr16", read_hr16), ("lr", read_lr), ("crop", read_crop)]}  # fmt: skip
    per = {k: v / len(rows) * 1000 for k, v in times.items()}
    print(f"NIfTI decode + encode (4 files -> float32 stack): {per['nifti']:8.2f} ms/subject")
    print(f"cache hr.npy -> float32 stack:                    {per['hr']:8.2f} ms/subject  "
          f"ratio {times['nifti'] / times['hr']:.1f}x")  # fmt: skip
    print(f"cache hr.npy as stored (float16, no conversion):  {per['hr16']:8.2f} ms/subject  "
          f"ratio {times['nifti'] / times['hr16']:.1f}x")  # fmt: skip
    print(f"cache lr.npy (base item):                         {per['lr']:8.2f} ms/subject  "
          f"ratio {times['nifti'] / times['lr']:.1f}x")  # fmt: skip
    print(f"cache SR crop {args.crop}^3 + upsampled lr crop:          {per['crop']:8.2f} ms/subject  "
          f"ratio {times['nifti'] / times['crop']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
