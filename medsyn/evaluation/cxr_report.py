"""The outputs of `medsyn evaluate-cxr` (`medsyn.evaluation.cxr`), each written atomically into --out:

metrics.json    per sample set: n, FID / MMD to the real held-out images, per finding accuracy, balanced
                accuracy, recall per class and confusion matrix; the real reference and ceiling
report.md       the tables, the features' label, the exact command
montage.png     a row of real held-out images and a row per sample set, titled with their expected labels
confusion.png   confusion matrices per set and finding
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medsyn.errors import DataError
from medsyn.evaluation.cxr import FINDINGS, FORMAT, CxrEvaluation
from medsyn.evaluation.features import metric_name
from medsyn.io import atomic_path, write_json, write_text

OUTPUT_FILES = ("metrics.json", "report.md", "montage.png", "confusion.png")
MONTAGE_COLUMNS = 8


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an --out that is a file, holds an earlier evaluation (unless `overwrite`), holds a metrics.json
    medsyn evaluate-cxr did not write (always), or holds other files (unless `overwrite`; they are kept)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if not out.is_dir():
        return out
    metrics = out / "metrics.json"
    if metrics.exists():
        try:
            ours = json.loads(metrics.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(f"--out {out}: holds a metrics.json that medsyn evaluate-cxr did not write; "
                            "choose another folder")  # fmt: skip
    existing = [n for n in OUTPUT_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise DataError(f"--out {out}: already holds an evaluation ({', '.join(existing)}); choose another "
                        "folder or pass --overwrite to replace those files")  # fmt: skip
    foreign = sorted(
        p.name for p in out.iterdir()
        if p.name not in OUTPUT_FILES and p.name != "classifier" and not p.name.startswith(".")
    )  # fmt: skip
    if foreign and not overwrite:
        raise DataError(
            f"--out {out}: holds files medsyn evaluate-cxr did not write ({', '.join(foreign[:3])}); choose a "
            "new or empty folder, or pass --overwrite to write beside them (they are kept)"
        )
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _finding_rows(metrics: dict) -> list[tuple[str, dict]]:
    real = metrics["real"]
    rows = [
        (f"real {real['split']} vs cache labels (reference)", real["reference"]),
        (f"real {real['split']} vs their reports (ceiling)", real["ceiling"]),
    ]
    return rows + [(name, s["findings"]) for name, s in metrics["samples"].items()]


def render_report(metrics: dict, command: str | None = None) -> str:
    """report.md: inputs, the features' label, FID table, finding table (as the paper's Table 2), recalls."""
    real, clf, feats = metrics["real"], metrics["classifier"], metrics["features"]
    fid_name = metric_name("FID", feats["trained"])
    mmd_name = metric_name("MMD", feats["trained"])
    parts = ["# medsyn evaluate-cxr", ""]
    if command:
        parts += ["```", command, "```", ""]
    parts += [
        f"- real held-out: `{real['source']}`, split `{real['split']}` ({real['n']} images)",
        f"- classifier: trained on `{clf['train']['cache']}` split `{clf['train']['split']}` "
        f"({clf['train']['n']} images, {clf['epochs']} epochs, a small CNN on images area-averaged to "
        f"{clf['model']['input_size']}^2"
        + (", reused" if clf.get("reused") else f", {clf['train_seconds']:.0f} s")
        + f"), in `{clf['directory']}`",
        f"- 2D features: {feats['label']}",
        f"- time: {metrics['seconds']:.0f} s",
        "",
        "## Distribution distance to the real held-out images",
        "",
    ]
    rows = [
        [name, str(s["n"]), _fmt(s.get("fid"), 4), _fmt(s.get("mmd"), 3)]
        for name, s in metrics["samples"].items()
    ]
    tvr = real["train_vs_real"]
    rows.append([f"real train ({tvr['n_train']}) vs real {real['split']}", str(real["n"]),
                 _fmt(tvr.get("fid"), 4), _fmt(tvr.get("mmd"), 3)])  # fmt: skip
    parts += [_table(["set", "n", fid_name, mmd_name], rows), ""]
    parts.append("FID is biased upwards with few images: compare sets of the same size; the real train vs real "
                 "held-out row is the floor two real sets reach.")  # fmt: skip
    if not feats["trained"]:
        parts.append("These are scores on random features, a weak baseline that only ranks generators against "
                     "each other with the same settings; pass `--features` with trained 2D ResNet weights for "
                     "numbers comparable with papers.")  # fmt: skip
    parts += ["", "## Do the findings survive? (as the paper's Table 2)", ""]
    rows = []
    for name, scores in _finding_rows(metrics):
        e, c = scores["effusion"], scores["cardiomegaly"]
        rows.append([name, str(e["n"]), _pct(e["accuracy"]), _pct(e["balanced_accuracy"]),
                     str(c["n"]), _pct(c["accuracy"]), _pct(c["balanced_accuracy"])])  # fmt: skip
    parts += [
        _table(
            [
                "set",
                "n (effusion)",
                "effusion side acc.",
                "effusion side bal. acc.",
                "n (cardiomegaly)",
                "cardiomegaly acc.",
                "cardiomegaly bal. acc.",
            ],
            rows,
        ),  # fmt: skip
        "",
        "A sample's expected labels are read from its prompt (`medsyn.radiograph.labels.report_labels`); "
        "samples whose prompt names an effusion without its side are left out of the effusion columns. "
        "Chance balanced accuracy: 25% for the effusion side (4 classes), 50% for cardiomegaly. The ceiling "
        "row scores real held-out images against their own reports the same way: a generator cannot be "
        "expected to do better than it.",
        "",
        "### Recall per class",
        "",
    ]
    classes = [(f, c) for f in FINDINGS for c in FINDINGS[f]]
    rows = [
        [name, *(_pct(scores[f]["recall"][c]) for f, c in classes)] for name, scores in _finding_rows(metrics)
    ]
    parts += [_table(["set", *(f"{f}: {c}" for f, c in classes)], rows), ""]
    agree = real["report_label_agreement"]
    counts = ", ".join(f"{a['agree']}/{a['n']} ({name})" for name, a in agree.items())
    parts.append(f"Labels read from the real reports agree with the cache labels for {counts} images.")
    parts += ["", "## Plots", "", "![montage](montage.png)", "", "![confusion matrices](confusion.png)"]
    return "\n".join(parts) + "\n"


def _label_text(label: dict) -> str:
    """Short labels for a montage caption: "R eff., CM", "no eff., normal heart"."""
    side = {
        "none": "no eff.",
        "left": "L eff.",
        "right": "R eff.",
        "bilateral": "bilat. eff.",
        None: "eff. (side?)",
    }
    heart = "CM" if label.get("cardiomegaly") else "normal heart"
    return f"{side[label.get('effusion')]}, {heart}"


def _tile(image: torch.Tensor) -> np.ndarray:
    gray = ((image[0].numpy() + 1) / 2).clip(0, 1)
    repeat = max(1, -(-128 // gray.shape[0]))
    gray = np.kron(gray, np.ones((repeat, repeat), dtype=np.float32))
    return np.repeat(gray[..., None], 3, axis=-1)


def plot_montage(evaluation: CxrEvaluation, path: str | os.PathLike, columns: int = MONTAGE_COLUMNS) -> None:
    """A row of real held-out images and a row per sample set, titled with the labels they should show."""
    from medsyn.viz import preview_grid, save_png

    columns = min(columns, max(len(s.ids) for s in evaluation.sets))
    images, captions = [], []
    for s in evaluation.sets:
        for i in range(columns):
            if i < len(s.ids):
                images.append(_tile(s.images[i]))
                where = f"{s.name}: {s.ids[i]}" if i == 0 else s.ids[i]
                captions.append(f"{where} | {_label_text(s.expected[i])}")
            else:
                images.append(np.zeros_like(images[-1]))
                captions.append("")
    save_png(path, preview_grid(images, captions, ncols=columns))


def plot_confusion(metrics: dict, path: str | os.PathLike) -> None:
    """Confusion matrices per set and finding (rows: expected, columns: predicted; colour: row fraction)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _finding_rows(metrics)
    fig = Figure(figsize=(8, 3.3 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    for r, (name, scores) in enumerate(rows):
        for c, finding in enumerate(FINDINGS):
            ax = fig.add_subplot(len(rows), 2, 2 * r + c + 1)
            matrix = np.asarray(scores[finding]["confusion"], dtype=float)
            shown = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
            ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
            classes = FINDINGS[finding]
            ax.set_xticks(range(len(classes)), classes, fontsize=8)
            ax.set_yticks(range(len(classes)), classes, fontsize=8)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("expected", fontsize=8)
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if shown[i, j] > 0.5 else "black")  # fmt: skip
            ax.set_title(
                f"{name}\n{finding} (bal. acc. {_pct(scores[finding]['balanced_accuracy'])})", fontsize=8
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_outputs(
    evaluation: CxrEvaluation, out_dir: str | os.PathLike, overwrite: bool = False, command: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:  # fmt: skip
    """Write metrics.json, report.md, montage.png and confusion.png into `out_dir`, each atomically."""
    out = check_out_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**evaluation.metrics, "command": command}
    plot_montage(evaluation, out / "montage.png")
    plot_confusion(metrics, out / "confusion.png")
    write_text(out / "report.md", render_report(metrics, command))
    write_json(out / "metrics.json", metrics)
    log(f"medsyn evaluate-cxr: metrics.json, report.md, montage.png and confusion.png in {out}")
    return out
