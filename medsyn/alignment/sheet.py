"""The codebook's preview sheet (`keypatches.png`): one row per frequent word, its best keypatches.

Each keypatch shows as two panels: the axial mid-slice of the patch's CT channel, and, when the source
volume is given, an axial crop of that volume through the patch's centre with the patch box drawn.
Axial views follow `medsyn.viz` (radiological: patient right on the viewer's left, anterior up); the CT
is shown in the lung window. Drawn with `matplotlib.figure.Figure` on the Agg canvas (no pyplot).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medsyn.alignment.codebook import Codebook
from medsyn.data.channels import encode_ct
from medsyn.viz import WINDOWS, save_png

CONTEXT_PATCHES = 4  # the context crop spans this many patches per side (less at the volume's edge)
_PANEL_INCHES, _DPI = 1.1, 100
_BG, _FG, _BOX = "#101010", "#e8e8e8", "#ffcc00"


def frequent_words(codebook: Codebook, words: int = 8) -> list[tuple[str, list[int]]]:
    """The `words` words (lower case) that chose the most keypatches, each with its keypatch indices, best
    score first. Ties: the word with the better best keypatch first."""
    groups: dict[str, list[int]] = {}
    for i, kp in enumerate(codebook.keypatches):
        groups.setdefault(kp.word.lower(), []).append(i)
    for indices in groups.values():
        indices.sort(key=lambda i: (-codebook.keypatches[i].score, i))
    counts = Counter({w: len(ix) for w, ix in groups.items()})
    order = sorted(counts, key=lambda w: (-counts[w], -codebook.keypatches[groups[w][0]].score, w))
    return [(w, groups[w]) for w in order[:words]]


def _axial(plane: np.ndarray) -> np.ndarray:
    """An axial (I, J) plane in display order: rows anterior -> posterior, columns right -> left."""
    return plane[::-1, ::-1].T


def keypatch_sheet(
    codebook: Codebook,
    volumes: Mapping[str, np.ndarray] | None = None,
    words: int = 8,
    per_word: int = 6,
) -> np.ndarray:
    """The sheet as an RGB uint8 image. volumes: subject id -> its base-resolution volume (C, *S), for
    the context crops (subjects without one get the patch panel only)."""
    rows = frequent_words(codebook, words)
    if not rows:
        raise ValueError("keypatch_sheet: the codebook has no keypatches")
    volumes = volumes or {}
    vmin, vmax = (float(encode_ct(hu)) for hu in WINDOWS["lung"])
    ncols = 2 * min(per_word, max(len(ix) for _, ix in rows))
    height = _PANEL_INCHES * 1.3 * len(rows) + 0.15  # room for each row's titles
    fig = Figure(figsize=(_PANEL_INCHES * (ncols + 1), height), dpi=_DPI, facecolor=_BG)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols + 1, squeeze=False)
    top = 1 - 0.35 / height
    fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=0.05 / height, wspace=0.08, hspace=0.4)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (word, indices) in enumerate(rows):
        axes[r, 0].text(
            0.95,
            0.5,
            f"{word}\n({len(indices)})",
            ha="right",
            va="center",
            color=_FG,
            fontsize=9,
            transform=axes[r, 0].transAxes,
        )
        for n, i in enumerate(indices[: ncols // 2]):
            kp = codebook.keypatches[i]
            patch = codebook.patches[i, 0].float().numpy()  # (p, p, p) CT channel
            ax = axes[r, 1 + 2 * n]
            ax.imshow(
                _axial(patch[:, :, patch.shape[2] // 2]),
                cmap="gray",
                vmin=vmin,
                vmax=vmax,
                interpolation="nearest",
            )
            ax.set_title(f"{kp.subject}\n{kp.score:.2f}", color=_FG, fontsize=6, pad=2)
            if kp.subject in volumes:
                _context(axes[r, 2 + 2 * n], np.asarray(volumes[kp.subject][0]), kp.box, vmin, vmax)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _context(ax, ct: np.ndarray, box: tuple[tuple[int, int], ...], vmin: float, vmax: float) -> None:
    """An axial crop of `ct` (*S) around `box`, at its middle level, with the box outlined."""
    (i0, i1), (j0, j1), (k0, k1) = box
    half = CONTEXT_PATCHES * (i1 - i0) // 2
    lo = [
        max(0, min((a + b) // 2 - half, n - 2 * half))
        for (a, b), n in zip(box[:2], ct.shape[:2], strict=True)
    ]
    hi = [min(n, a + 2 * half) for a, n in zip(lo, ct.shape[:2], strict=True)]
    crop = np.asarray(ct[lo[0] : hi[0], lo[1] : hi[1], (k0 + k1) // 2], dtype=np.float32)  # (I, J)
    ax.imshow(_axial(crop), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    width, height = crop.shape
    # display column = I - 1 - i, row = J - 1 - j (see `_axial`)
    x0, y0 = width - (i1 - lo[0]) - 0.5, height - (j1 - lo[1]) - 0.5
    ax.add_patch(Rectangle((x0, y0), i1 - i0, j1 - j0, fill=False, edgecolor=_BOX, linewidth=0.8))


def write_keypatch_sheet(
    path: str | os.PathLike,
    codebook: Codebook,
    volumes: Mapping[str, np.ndarray] | None = None,
    words: int = 8,
    per_word: int = 6,
) -> None:
    """Render `keypatch_sheet` to a PNG file (atomically)."""
    save_png(path, keypatch_sheet(codebook, volumes, words, per_word))
