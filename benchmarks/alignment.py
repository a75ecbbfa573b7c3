"""Does a trained align run know where its words are? The pointing game on held-out phantoms (issue 13, 5).

    python benchmarks/alignment.py pointing --align runs/demo/align --cache data/phantom/cache \\
        [--phantoms data/phantom/phantoms] [--split test] [--out runs/demo/align/pointing]

For each subject of the cache's split (phantoms only: each needs its `truth.json`, found in --phantoms,
next to the CT the cache was prepared from, or in the run's `data.phantoms.out`), the report is encoded
as the run was trained (`data.text`) and the base-resolution volume (`lr.npy`) into patch tokens. Every
word of the report that names a target (`medsyn.alignment.pointing.TARGETS`: effusion; nodule, mass,
lesion; consolidation; bulla, bullae, bullous; upper; lower) and whose true region is not empty is a
case; its guess is its most similar patch. True regions are rebuilt from the phantom's own drawing (the
phantom is drawn again from its truth, `phantom_from_truth`, and its `FindingRegions` brought onto the
cache's high-resolution grid):
- effusion: the pleural fluid; nodule: all placed lesions (nodules and masses); consolidation: the dense
  part of the consolidated lobes; bullae: all bullae;
- upper / lower: the lobe named when the word before is "left" / "right" (every phantom report names
  the side), else both upper (lower) lobes.
Mentions of absent findings (negations such as "No pleural effusion.", or "pericardial effusion") have
an empty region and are counted as `absent_mentions`, not as cases. Every mention is a case, so a report
naming a finding twice (Findings and Impression) gives two cases.

Rules: a guess is a hit under `overlap` when its patch's voxel box (patch p covers high-resolution
voxels [s p, s (p + 1)) per axis, s = base factor x patch size) holds any region voxel, and under the
stricter `centre` when the box's centre point lies in the region. Baseline: the chance that a uniformly
random patch is a hit, among the patches inside the body (half their voxels or more in the body) and
among all patches, averaged over the same cases. p: one-sided binomial test of hits >= observed with
that mean chance (scipy.stats.binomtest; cases of one report are not independent, so read it loosely).

Writes OUT/pointing.json (settings, per word: cases, subjects, absent_mentions and per rule hits,
accuracy, baseline_body, baseline_all, p_body, p_all; every case) and OUT/pointing.png (accuracy vs
baseline per word, and example slices: the true region's contour and the chosen patch's box). Prints a
table and ends with one JSON line {word: {cases, overlap: {accuracy, baseline_body, p_body}, centre: ...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsyn.alignment.model import patch_box
from medsyn.alignment.pointing import (
    RULES,
    TARGETS,
    PointingCase,
    body_mask,
    point,
    summarise,
    target_masks,
    target_of,
    word_region,
)
from medsyn.alignment.run import AlignRun, load_align_run
from medsyn.data.cache import SPLITS, load_array, read_cache_manifest, read_meta
from medsyn.data.channels import decode_ct
from medsyn.data.datamodule import report_text
from medsyn.data.phantom import phantom_from_truth
from medsyn.data.preprocess import PreprocessConfig, to_grid
from medsyn.errors import DataError
from medsyn.io import write_json

EXAMPLES = 6  # example slices in the figure: each word's first case, then each word's second, ...


@dataclass
class Example:
    """One case's picture: an axial slice (I, J) of the CT in HU, the region on it, the patch box."""

    case: PointingCase
    hu: np.ndarray  # (I, J)
    region: np.ndarray  # (I, J) bool
    box: tuple[slice, slice]  # i, j extent of the chosen patch
    k: int
    in_box: bool  # whether slice k passes through the chosen patch


def truth_file(subject: str, meta: dict, phantoms: Path | None, generated: Path | None = None) -> Path:
    """The subject's phantom truth.json: in `phantoms` (--phantoms), next to the CT it was prepared from,
    or in `generated` (the run's `data.phantoms.out`); a `DataError` naming every place looked."""
    places = [phantoms / subject] if phantoms is not None else []
    if meta.get("ct"):
        places.append(Path(meta["ct"]).parent)
    if generated is not None:
        places.append(generated / subject)
    for place in places:
        if (place / "truth.json").is_file():
            return place / "truth.json"
    looked = ", ".join(str(p / "truth.json") for p in places) or "nowhere (no --phantoms, no ct in meta.json)"
    raise DataError(f"subject {subject}: no phantom truth.json (looked in {looked}); pass --phantoms DIR")


def masks_on_cache_grid(path: Path, meta: dict, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The target masks (`target_masks`) of the phantom whose truth is `path`, on the cache's
    high-resolution grid (`shape`, `meta["affine"]`): as drawn when the phantom's grid is that grid, else
    by the `medsyn prepare` chain the cache was made with."""
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the phantom truth ({err})") from err
    phantom = phantom_from_truth(truth, path)
    masks = target_masks(phantom.regions, phantom.lobes)
    affine = np.asarray(meta.get("affine", phantom.affine), np.float64)
    if phantom.lobes.shape == tuple(shape) and np.allclose(affine, phantom.affine):
        return masks
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    cfg = PreprocessConfig(size=tuple(shape), spacing_mm=spacing, fit=meta.get("fit", "crop"))
    _, moved, _ = to_grid(phantom.ct, phantom.affine, {k: v.astype(np.uint8) for k, v in masks.items()}, cfg)
    return {k: v if k == "lobes" else v.astype(bool) for k, v in moved.items()}


def play(run: AlignRun, cache: Path, rows: list[dict], phantoms: Path | None, batch_size: int,
         examples: int) -> tuple[list[PointingCase], dict[str, int], list[Example]]:  # fmt: skip
    """All cases of the subjects `rows`, the absent mentions per target, and up to `examples` pictures
    (taken in turn from each target's first cases)."""
    data = run.config.get("data") or {}
    text_mode = data.get("text", "both")
    generated = Path(data["phantoms"]["out"]) if (data.get("phantoms") or {}).get("out") else None
    cases: list[PointingCase] = []
    absent = dict.fromkeys(TARGETS, 0)
    pictures: dict[str, list[Example]] = {t: [] for t in TARGETS}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        x = torch.stack([torch.from_numpy(np.asarray(load_array(r["lr"]), np.float32)) for r in batch])
        _, patches, grid = run.encode_volumes(x)  # (B, P, D)
        _, words, feats = run.encode_reports([report_text(r, text_mode) for r in batch])
        for b, row in enumerate(batch):
            hr = load_array(row["hr"])  # (4, I, J, K)
            factor = hr.shape[1] // x.shape[2]
            stride = factor * run.patch_size
            meta = read_meta(cache, row["id"])
            masks = masks_on_cache_grid(truth_file(row["id"], meta, phantoms, generated), meta, hr.shape[1:])
            hu = decode_ct(np.asarray(hr[0], np.float32))  # (I, J, K)
            body = body_mask(hu)
            similarity = run.word_patch_similarity(feats[b], patches[b]).cpu().numpy()  # (W, P)
            for position, word in enumerate(words[b]):
                target = target_of(word)
                if target is None:
                    continue
                region, what = word_region(words[b], position, masks)
                if not region.any():
                    absent[target] += 1
                    continue
                chosen, hit, chance_body, chance_all = point(similarity[position], region, body, grid, stride)
                case = PointingCase(row["id"], target, word, position, what, int(region.sum()), chosen,
                                    float(similarity[position, chosen]), hit, chance_body, chance_all)  # fmt: skip
                cases.append(case)
                if len(pictures[target]) < examples:
                    pictures[target].append(picture(case, hu, region, grid, stride))
    in_turn = [p for rank in range(examples) for mine in pictures.values() for p in mine[rank : rank + 1]]
    return cases, absent, in_turn[:examples]


def picture(case: PointingCase, hu: np.ndarray, region: np.ndarray, grid, stride: int) -> Example:
    """An axial slice (k) showing the chosen patch and the region: the slice through the patch with most
    region voxels in the patch, else with most region voxels anywhere, else (the region lies wholly above
    or below the patch) the region's slice nearest to the patch."""
    box = patch_box(case.patch, grid, stride)  # on the high-resolution grid
    ks = np.arange(box[2].start, min(box[2].stop, hu.shape[2]))
    in_patch = region[box[0], box[1], ks].sum(axis=(0, 1))  # (len(ks),)
    anywhere = region[:, :, ks].sum(axis=(0, 1))
    if in_patch.any() or anywhere.any():
        k, in_box = int(ks[np.argmax(in_patch if in_patch.any() else anywhere)]), True
    else:
        slices = np.flatnonzero(region.any(axis=(0, 1)))
        k, in_box = int(slices[np.argmin(np.abs(slices - ks.mean()))]), False
    return Example(case, hu[:, :, k], region[:, :, k], box[:2], k, in_box)


def figure(path: Path, summary: dict, pictures: list[Example], title: str) -> None:
    """Bar chart of accuracy vs chance per word and rule, then the example slices."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    columns = 3
    rows = 1 + -(-len(pictures) // columns)
    fig = plt.figure(figsize=(12, 3.6 * rows), dpi=100)
    grid = fig.add_gridspec(rows, columns)
    ax = fig.add_subplot(grid[0, :])
    names = list(summary)
    at = np.arange(len(names))
    width = 0.2
    bars = [("overlap", "accuracy", "overlap: accuracy", "#3d8fe0"),
            ("overlap", "baseline_body", "overlap: chance (body)", "#a9c9ec"),
            ("centre", "accuracy", "centre: accuracy", "#e0763d"),
            ("centre", "baseline_body", "centre: chance (body)", "#f0c2a8")]  # fmt: skip
    for n, (rule, key, label, color) in enumerate(bars):
        values = [summary[w][rule][key] or 0.0 for w in names]
        ax.bar(at + (n - 1.5) * width, values, width, label=label, color=color)
    ax.set_xticks(at, [f"{w}\n(n={summary[w]['cases']})" for w in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of cases")
    ax.set_title(
        f"{title}\nexamples: true region green, chosen patch red (dashed: the patch is above or below)"
    )
    ax.legend(ncol=4, fontsize=8, loc="upper right")
    for n, ex in enumerate(pictures):
        ax = fig.add_subplot(grid[1 + n // columns, n % columns])
        # RAS: i runs to the patient's right, j anteriorly; shown radiologically (right on the left, anterior up)
        ax.imshow(ex.hu.T, cmap="gray", vmin=-1000, vmax=400, origin="lower")
        if ex.region.any():
            ax.contour(ex.region.T.astype(float), levels=[0.5], colors="#39ff6a", linewidths=1.2)
        i, j = ex.box
        ax.add_patch(Rectangle((i.start - 0.5, j.start - 0.5), i.stop - i.start, j.stop - j.start, fill=False,
                               edgecolor="#ff3030", linewidth=1.5, linestyle="-" if ex.in_box else "--"))  # fmt: skip
        ax.set_xlim(ex.hu.shape[0] - 0.5, -0.5)
        ax.text(0.02, 0.5, "R", color="w", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.98, 0.5, "L", color="w", transform=ax.transAxes, fontsize=8, va="center", ha="right")
        c = ex.case
        verdict = "hit" if c.hit["overlap"] else "miss"
        where = f"axial k={ex.k}" + ("" if ex.in_box else " (patch above/below: dashed)")
        ax.set_title(f"{c.subject}: '{c.word}' ({c.region})\n{verdict}, {where}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pointing(args: argparse.Namespace) -> dict:
    run = load_align_run(args.align, args.device)
    cache = Path(args.cache or (run.config.get("data") or {}).get("root") or "")
    rows = read_cache_manifest(cache)
    rows = [r for r in rows if args.split == "all" or r["split"] == args.split][: args.max_subjects]
    if not rows:
        raise DataError(f"{cache}: no subjects in split {args.split!r}")
    started = time.perf_counter()
    phantoms = Path(args.phantoms) if args.phantoms else None
    cases, absent, pictures = play(run, cache, rows, phantoms, args.batch_size, args.examples)
    summary = summarise(cases, absent)
    out = Path(args.out or run.run_dir / "pointing")
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "align": str(run.run_dir), "weights_sha256": run.sha256, "cache": str(cache), "split": args.split,
        "subjects": len(rows), "patch_size": run.patch_size, "seconds": round(time.perf_counter() - started, 1),
        "targets": {t: list(s) for t, s in TARGETS.items()},
        "rules": {"overlap": "the chosen patch's voxel box holds a region voxel",
                  "centre": "the chosen patch's centre point lies in the region (closed voxel cubes)",
                  "baseline_body": "mean over cases of the share of body patches (>= half body voxels) that hit",
                  "baseline_all": "mean over cases of the share of all patches that hit",
                  "p": "one-sided binomial test of accuracy > baseline (scipy.stats.binomtest)"},
        "words": summary,
        "cases": [c.to_dict() for c in cases],
    }  # fmt: skip
    write_json(out / "pointing.json", report)
    figure(
        out / "pointing.png", summary, pictures, f"pointing game: {run.run_dir} on {args.split} ({len(rows)})"
    )
    return report


def print_table(report: dict) -> None:
    def cell(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"\n{report['subjects']} subjects of {report['cache']} ({report['split']}), {report['seconds']} s")
    print("| word | cases | rule | hits | accuracy | chance (body) | chance (all) | p (body) | p (all) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for word, w in report["words"].items():
        for rule in RULES:
            r = w[rule]
            print(f"| {word} | {w['cases']} | {rule} | {r['hits']} | {cell(r['accuracy'], '.3f')} | "
                  f"{cell(r['baseline_body'], '.3f')} | {cell(r['baseline_all'], '.3f')} | "
                  f"{cell(r['p_body'], '.3g')} | {cell(r['p_all'], '.3g')} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pointing", help="the pointing game on held-out phantoms")
    p.add_argument("--align", required=True, help="align run directory (its model.safetensors)")
    p.add_argument("--cache", help="prepared phantom cache (default: the run's data.root)")
    p.add_argument("--phantoms", help="phantom dataset folder with <id>/truth.json (default: see above)")
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"])
    p.add_argument("--out", help="output folder (default: ALIGN/pointing)")
    p.add_argument("--max-subjects", type=int, default=None, help="only the first N subjects of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--examples", type=int, default=EXAMPLES, help="example slices in the figure")
    p.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        report = pointing(args)
    except DataError as err:
        sys.exit(f"error: {err}")
    print_table(report)
    short = {w: {"cases": v["cases"], **{rule: {k: v[rule][k] for k in ("accuracy", "baseline_body", "p_body")}
                                          for rule in RULES}} for w, v in report["words"].items()}  # fmt: skip
    print(json.dumps(short))


if __name__ == "__main__":
    main()
