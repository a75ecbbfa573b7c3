"""The outputs of `medsyn evaluate`: metrics.json, report.md, plots, and optionally a W&B run.

Files written into the output folder (each atomically, only after every volume is measured):
    metrics.json   samples / real per-volume measures, distribution distances, summary, audit, and
                   with --align the alignment scores (`alignment`)
    report.md      the tables, naming the features every distance was computed on
    measures.png   per-measure distributions of samples and real volumes (as MedSyn's Fig. 5)
    montage.png    previews of the first samples
    audit.png      nearest-training-volume distances of held-out volumes and of samples
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medsyn.errors import DataError
from medsyn.evaluation.audit import plot_audit
from medsyn.evaluation.evaluate import Evaluation
from medsyn.evaluation.measures import UNITS
from medsyn.evaluation.volumes import load_volume
from medsyn.io import atomic_path, write_json, write_text
from medsyn.tracking import wandb_offline
from medsyn.viz import preview_grid, render_preview, save_png

OUTPUT_FILES = ("metrics.json", "report.md", "measures.png", "montage.png", "audit.png")
MONTAGE_SIZE = 12


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to replace an earlier evaluation's files unless `overwrite`; other files are never touched."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(f"--out {out}: already holds an evaluation ({', '.join(existing)}); choose another "
                        "folder or pass --overwrite to replace those files")  # fmt: skip
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if magnitude < 1 else f"{value:.2f}"


def _mean_sd(stat: dict) -> str:
    if stat.get("mean") is None:
        return "-"
    sd = stat.get("sd")
    return _fmt(stat["mean"]) + (f" ± {_fmt(sd)}" if sd is not None else "")


def describe(key: str) -> str:
    """A measure's description with its unit, e.g. "pleural effusion volume (mL)"."""
    what, unit = UNITS.get(key, (key, ""))
    return f"{what} ({unit})" if unit else what


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(metrics: dict) -> str:
    """The measures table: samples and real mean ± sd and their Wasserstein distance."""
    w = metrics["distribution"].get("wasserstein", {})
    rows = [
        [describe(key), f"`{key}`", _mean_sd(stat["samples"]), _mean_sd(stat["real"]),
         _fmt(w.get(key))]
        for key, stat in metrics["summary"].items()
    ]  # fmt: skip
    return _table(["measure", "key", "samples (mean ± sd)", "real (mean ± sd)", "Wasserstein"], rows)


def distance_table(metrics: dict) -> str:
    """FID / MMD / 2.5D FID, each with the metric's honest name and the features it used."""
    d = metrics["distribution"]
    rows = []
    for key in ("fid_3d", "mmd_3d"):
        if key in d:
            rows.append([d[key]["metric"], _fmt(d[key]["value"], 4), d[key]["features"]])
    if "fid_25d" in d:
        f = d["fid_25d"]
        planes = ", ".join(f"{p} {_fmt(f[p], 4)}" for p in ("axial", "coronal", "sagittal") if p in f)
        rows.append([f["metric"], f"{_fmt(f['mean'], 4)} ({planes})", f["features"]])
    if not rows:
        return d.get("note", "no distribution distances")
    return _table(["metric", "value", "features"], rows)


def truth_table(comparison: dict[str, dict]) -> str:
    """Measured vs ground truth per phantom (effusion, CTR, %LAA-950, lung volume)."""
    keys = ["effusion_ml", "effusion_left_ml", "effusion_right_ml", "ctr", "laa950_pct", "lung_ml"]
    rows = []
    for subject, row in comparison.items():
        cells = [subject]
        for key in keys:
            c = row.get(key)
            cells.append("-" if c is None else f"{_fmt(c['measured'])} / {_fmt(c['truth'])}")
        rows.append(cells)
    errors = []
    for key in keys:
        values = [abs(r[key]["error"]) for r in comparison.values() if key in r]
        errors.append(_fmt(max(values)) if values else "-")
    rows.append(["**max abs error**", *errors])
    return _table(["phantom", *(f"{k} (measured / truth)" for k in keys)], rows)


_AUDIT_KEYS = {"features": "nearest_train", "voxels": "nearest_train_voxels"}


def _spread(values: list[float], parts: int = 3) -> str:
    if not values:
        return "-"
    stats = [min(values), float(np.median(values)), max(values)][:parts]
    return " / ".join(_fmt(v, 4) for v in stats)


def audit_section(metrics: dict) -> str:
    """The audit's thresholds, the distances they come from, and the flagged samples."""
    a = metrics["audit"]
    flagged = [k for k, s in metrics["samples"].items() if s.get("near_copy")]
    n_ref = len(a["reference"]["ids"])
    where = "leave-one-out within --real" if metrics["inputs"]["train_is_real"] else "in --train"
    rows = [
        [space, _fmt(threshold, 4), _spread(a["reference"][space], 3),
         _spread([s[_AUDIT_KEYS[space]]["distance"] for s in metrics["samples"].values()], 3)]
        for space, threshold in a["thresholds"].items()
    ]  # fmt: skip
    lines = [
        f"Reference: each of the {n_ref} held-out volumes' distance to its nearest training volume ({where}). "
        f"A sample strictly closer than percentile {a['percentile']:g} of those distances in both "
        "spaces (features, and the CT downsampled to voxels) is flagged as a near copy.",
    ]
    if n_ref < 100 / max(a["percentile"], 1e-9):
        lines[0] += (f" With {n_ref} held-out volumes the threshold is their minimum; more held-out volumes "
                     "give a sharper test.")  # fmt: skip
    lines += [
        "",
        _table(
            ["space", "near-copy threshold", "held-out: min / median / max", "samples: min / median / max"],
            rows,
        ),
        "",
        f"**{len(flagged)} of {len(metrics['samples'])} samples flagged as near copies**"
        + (
            ": "
            + ", ".join(f"`{k}` (nearest `{metrics['samples'][k]['nearest_train']['id']}`)" for k in flagged)
            if flagged
            else "."
        ),  # fmt: skip
    ]
    return "\n".join(lines)


def consistency_table(metrics: dict) -> str | None:
    keys = [k for k in metrics["summary"] if k.endswith("_dice")]
    if not keys:
        return None
    return _table(["Dice (generated mask vs re-segmented CT)", "samples", "real"],
                  [[k, _mean_sd(metrics["summary"][k]["samples"]), _mean_sd(metrics["summary"][k]["real"])]
                   for k in keys])  # fmt: skip


def _mean_se(stat: dict) -> str:
    if stat.get("mean") is None:
        return "-"
    return _fmt(stat["mean"]) + (f" ± {_fmt(stat['se'])}" if stat.get("se") is not None else "")


_ALIGN_ROWS = {
    "samples": "samples with their prompts",
    "real_matched": "real volumes with their own reports",
    "real_mismatched": "real volumes with the other reports (mismatched)",
}


def alignment_section(alignment: dict) -> str:
    """The alignment scores of the samples against those of matched and mismatched real pairs."""
    run, grid, summary = alignment["align_run"], alignment["grid"], alignment["summary"]
    rows = [[label, str(summary[group]["global"]["n"]), _mean_se(summary[group]["global"]),
             _mean_se(summary[group]["fine"])] for group, label in _ALIGN_ROWS.items()]  # fmt: skip
    shape = "x".join(str(n) for n in grid["base_shape"])
    lines = [
        f"Align run `{run['run_dir']}` (sha256 {run['sha256'][:12]}), volumes on its base grid of {shape} "
        f"voxels at {_fmt(grid['spacing_mm'][0])} mm in {grid['patch_size']}^3-voxel patches. Global: cosine "
        "similarity of the report and volume embeddings (as the CLIP score with CT-CLIP); word-patch: mean over "
        "the report's words of each word's best patch similarity. Mean ± bootstrap standard error.",
        "",
        _table(["pairs", "n", "global (mean ± SE)", "word-patch (mean ± SE)"], rows),
        "",
        "Samples scoring like the matched real pairs show what their prompts ask for as clearly as real "
        "volumes show their reports; scoring like the mismatched pairs, no more than chance.",
    ]
    if alignment["skipped"]:
        skipped = ", ".join(f"`{s['id']}` ({s['role']}: {s['reason']})" for s in alignment["skipped"])
        lines += ["", f"Not scored: {skipped}."]
    return "\n".join(lines)


def render_report(metrics: dict, plots: list[str]) -> str:
    """report.md: inputs, features used, the measures, distances, consistency, audit, truth, failures."""
    inputs, dist = metrics["inputs"], metrics["distribution"]
    feats = dist["features"]
    parts = [
        "# medsyn evaluate",
        "",
        f"- samples: `{inputs['samples']}` ({len(metrics['samples'])} evaluated)",
        f"- real (held-out): `{inputs['real']}` ({len(metrics['real'])} evaluated)"
        + (f", split `{inputs['real_split']}`" if inputs.get("real_split") else ""),
        f"- training volumes for the audit: `{inputs['train']}`",
        f"- segmentation backend: `{inputs['backend']}` (every CT re-segmented; masks that came with a "
        "volume are compared with it)",
        f"- 3D features: {feats['label_3d']}",
        f"- 2D slice features: {feats['label_2d']}",
        "",
        "## Measures",
        "",
        summary_table(metrics),
        "",
        "## Distribution distances",
        "",
        distance_table(metrics),
    ]
    if "mmd_3d" in dist:
        parts += ["", "MMD is the unbiased estimate of the squared MMD with a Gaussian kernel (median-distance "
                  "bandwidth): about 0, possibly slightly negative, when both sets come from one distribution."]  # fmt: skip
    if not (feats["trained_3d"] and feats["trained_2d"]):
        parts += ["", "Scores on random features are a weak baseline that only ranks runs against each other "
                  "on the same machine and settings; pass `--features` (and `--features-2d`) with trained "
                  "weights for numbers comparable with papers."]  # fmt: skip
    if metrics.get("alignment"):
        parts += ["", "## Report-volume alignment", "", alignment_section(metrics["alignment"])]
    table = consistency_table(metrics)
    if table:
        parts += ["", "## Mask consistency", "", table]
    parts += ["", "## Memorization audit", "", audit_section(metrics)]
    for group in ("real", "samples"):
        if metrics["truth"][group]:
            parts += [
                "",
                f"## Measured vs ground truth ({group}, phantoms)",
                "",
                truth_table(metrics["truth"][group]),
            ]
    if metrics["failed"]:
        rows = [[f["id"], f"`{f['source']}`", ", ".join(f["roles"]), f["reason"]] for f in metrics["failed"]]
        parts += ["", "## Volumes not evaluated", "", _table(["id", "source", "used as", "reason"], rows)]
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def plot_measures(metrics: dict, path: str | os.PathLike) -> None:
    """One panel per measure: the samples' and the real volumes' values, as violins with points."""
    keys = [
        k
        for k, s in metrics["summary"].items()
        if s["samples"]["mean"] is not None or s["real"]["mean"] is not None
    ]
    ncols = min(4, max(1, len(keys)))
    nrows = -(-len(keys) // ncols) or 1
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    for n, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        groups = []
        for group in ("samples", "real"):
            values = [m.get(key) for m in metrics[group].values()]
            groups.append([float(v) for v in values if isinstance(v, (int, float)) and v is not None])
        for pos, (values, color) in enumerate(zip(groups, ("#d9544d", "#3c78d8"), strict=True), 1):
            if len(values) > 1 and np.ptp(values) > 0:
                parts = ax.violinplot([values], positions=[pos], showextrema=False, widths=0.8)
                for body in parts["bodies"]:
                    body.set_facecolor(color)
                    body.set_alpha(0.35)
            if values:
                ax.scatter(pos + rng.uniform(-0.12, 0.12, len(values)), values, s=10, color=color, zorder=3)
                ax.hlines(np.mean(values), pos - 0.3, pos + 0.3, color="black", linewidth=1.2)
        ax.set_xticks([1, 2], [f"samples\n(n={len(groups[0])})", f"real\n(n={len(groups[1])})"], fontsize=8)
        ax.set_title(f"{key} ({UNITS.get(key, (key, ''))[1]})", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per-volume measures: samples vs real (line: mean)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_montage(evaluation: Evaluation, path: str | os.PathLike, size: int = MONTAGE_SIZE) -> None:
    """Previews of the first `size` samples (sample.py's preview.png, or rendered from the volume)."""
    import matplotlib.image

    images, captions = [], []
    for key, sample in list(evaluation.metrics["samples"].items())[:size]:
        ref = evaluation.samples[key]
        if ref.preview is not None:
            image = (matplotlib.image.imread(ref.preview)[..., :3] * 255).astype(np.uint8)
        else:
            volume = load_volume(ref)
            image = render_preview(volume.hu, volume.masks or None, spacing=volume.affine, panel=160)
        images.append(image)
        flag = "  [NEAR COPY]" if sample.get("near_copy") else ""
        captions.append(f"{key}{flag}: {sample.get('prompt') or ''}")
    if images:
        save_png(path, preview_grid(images, captions, ncols=min(4, len(images))))


def log_wandb(metrics: dict, out: Path, plots: list[str], project: str, name: str | None) -> None:
    """The same summary, distances, per-volume table and plots as a W&B run (offline without a login)."""
    import wandb

    from medsyn.evaluation.measures import MEASURES

    run = wandb.init(project=project, name=name or out.name, dir=str(out), job_type="evaluate",
                     config=metrics["inputs"], mode="offline" if wandb_offline() else "online")  # fmt: skip
    try:
        flat = {}
        for key, stat in metrics["summary"].items():
            for group in ("samples", "real"):
                for s in ("mean", "sd"):
                    if stat[group][s] is not None:
                        flat[f"summary/{key}/{group}_{s}"] = stat[group][s]
        dist = metrics["distribution"]
        for key in ("fid_3d", "mmd_3d"):
            if key in dist:
                flat[f"distribution/{dist[key]['metric']}"] = dist[key]["value"]
        if "fid_25d" in dist:
            flat[f"distribution/{dist['fid_25d']['metric']}"] = dist["fid_25d"]["mean"]
        for key, value in dist.get("wasserstein", {}).items():
            flat[f"distribution/wasserstein/{key}"] = value
        for group, stat in (metrics.get("alignment") or {}).get("summary", {}).items():
            for score in ("global", "fine"):
                if stat[score]["mean"] is not None:
                    flat[f"alignment/{group}/{score}"] = stat[score]["mean"]
        flat["audit/near_copies"] = sum(bool(s.get("near_copy")) for s in metrics["samples"].values())
        columns = ["group", "id", *MEASURES, "near_copy"]
        table = wandb.Table(columns=columns)
        for group in ("samples", "real"):
            for key, m in metrics[group].items():
                table.add_data(group, key, *(m.get(k) for k in MEASURES), m.get("near_copy"))
        images = {f"plots/{Path(p).stem}": wandb.Image(str(out / p)) for p in plots}
        run.log({**flat, **images, "volumes": table})
        run.summary.update(flat)
    finally:
        run.finish()


def write_outputs(
    evaluation: Evaluation,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    wandb_project: str | None = None,
    wandb_name: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write metrics.json, the plots and report.md into `out_dir` (and a W&B run with a project)."""
    metrics = evaluation.metrics
    out = check_out_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    plots = ["measures.png", "montage.png", "audit.png"]
    plot_measures(metrics, out / "measures.png")
    plot_montage(evaluation, out / "montage.png")
    plot_audit(evaluation.audit, out / "audit.png")
    plots = [p for p in plots if (out / p).is_file()]
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", render_report(metrics, plots))
    if wandb_project:
        log_wandb(metrics, out, plots, wandb_project, wandb_name)
    log(f"medsyn evaluate: metrics.json, report.md and {len(plots)} plot(s) in {out}")
    return out
