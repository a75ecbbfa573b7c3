"""What does `medsyn evaluate` cost per volume, and where does the time go?

Makes one phantom at --size (256^3 at 1 mm by default, the paper's output grid), writes it as
NIfTI, then times each step `medsyn evaluate` runs on a sample: reading the files, the clinical
measures (re-segmentation with the threshold backend, fluid, heart, nodules), 3D features, 2.5D slice
features and the audit's voxel signature. The peer is the threshold segmentation alone, which
`medsyn prepare` runs on every subject: the ratio says how much evaluation adds to what a user already
pays per volume. Single-threaded by default (`--threads`), as one `--workers` process would run.

    python benchmarks/evaluate_cost.py --size 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from medsyn.data.phantom import generate_phantom, save_phantom
from medsyn.data.segment import get_backend, segment
from medsyn.evaluation.audit import voxel_signature
from medsyn.evaluation.features import build_feature_extractor
from medsyn.evaluation.measures import measure_volume
from medsyn.evaluation.volumes import find_volumes, load_volume


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - began)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--feature-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        phantom = generate_phantom(args.size, seed=[7, 3])
        save_phantom(Path(tmp) / "0", phantom)
        (Path(tmp) / "0" / "meta.json").write_text(json.dumps({"prompt": phantom.report.text()}))
        (ref,) = find_volumes(tmp)
        backend = get_backend("threshold")
        extractor = build_feature_extractor(input_size=args.feature_size, slice_size=args.feature_size)
        t = {}
        t["read"], volume = timed(lambda: load_volume(ref), args.repeats)
        t["measures"], measures = timed(
            lambda: measure_volume(volume.hu, volume.affine, volume.masks, backend), args.repeats
        )
        t["features_3d"], _ = timed(lambda: extractor.features_3d(volume.hu, volume.spacing), args.repeats)
        t["features_25d"], _ = timed(lambda: extractor.features_25d(volume.hu, volume.spacing), args.repeats)
        t["voxel_signature"], _ = timed(lambda: voxel_signature(volume.hu), args.repeats)
        t["peer_segmentation"], _ = timed(lambda: segment(volume.hu, volume.affine, backend), args.repeats)
    total = sum(v for k, v in t.items() if k != "peer_segmentation")
    print(f"one {args.size}^3 volume, {args.threads} thread(s), feature input {args.feature_size}^3:")
    for key, seconds in t.items():
        print(f"  {key:<18} {seconds:7.2f} s")
    print(f"  {'evaluate, total':<18} {total:7.2f} s  = {total / t['peer_segmentation']:.2f}x the threshold "
          f"segmentation alone (what prepare pays per subject)")  # fmt: skip
    print(f"  measured: effusion {measures['effusion_ml']} mL, CTR {measures['ctr']}, %LAA-950 "
          f"{measures['laa950_pct']} (truth {phantom.truth['effusion_ml']}, {phantom.truth['ctr']}, "
          f"{phantom.truth['laa950_percent']})")  # fmt: skip
    result = {"size": args.size, "threads": args.threads, **{f"{k}_s": round(v, 3) for k, v in t.items()},
              "total_s": round(total, 3), "ratio_to_segmentation": round(total / t["peer_segmentation"], 3)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
