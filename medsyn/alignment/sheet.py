"""The codebook's preview sheet (`keypatches.png`): one row per frequent word, its best keypatches.

Each keypatch shows as two panels: the patch, and, when its source image is given, a crop of that image
around the patch with the patch box drawn. For CT keypatches (3D) both are axial slices through the
patch's centre of the CT channel, in the lung window, following `medsyn.viz` (radiological: patient right
on the viewer's left, anterior up); for radiograph keypatches (2D) they are the image's own pixels as
stored (display window already applied: [-1, 1] is black to white). Drawn with
`matplotlib.figure.Figure` on the Agg canvas (no pyplot).
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

Box = tuple[tuple[int, int], ...]  # [start, stop) per axis
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


def _plane(image: np.ndarray, box: Box) -> tuple[np.ndarray, Box]:
    """The 2D plane of `image` (*S) a keypatch is shown in and the box's two in-plane intervals: a
    radiograph (H, W) as it is; a volume (I, J, K) at the box's middle level K."""
    if image.ndim == 2:
        return image, box
    (k0, k1) = box[2]
    return image[:, :, (k0 + k1) // 2], box[:2]


def _display(plane: np.ndarray, dims: int) -> np.ndarray:
    """A plane in display order: axial CT planes as `_axial` turns them, radiographs as stored."""
    return _axial(plane) if dims == 3 else plane


def _window(dims: int) -> tuple[float, float]:
    """(vmin, vmax) of the display: the lung window of the encoded CT, or a radiograph's [-1, 1]."""
    if dims == 2:
        return -1.0, 1.0
    low, high = (float(encode_ct(hu)) for hu in WINDOWS["lung"])
    return low, high


def keypatch_sheet(
    codebook: Codebook,
    volumes: Mapping[str, np.ndarray] | None = None,
    words: int = 8,
    per_word: int = 6,
) -> np.ndarray:
    """The sheet as an RGB uint8 image. volumes: subject id -> its image (C, *S), the base-resolution
    volume of a CT codebook or the radiograph of a 2D one, for the context crops (subjects without one
    get the patch panel only)."""
    rows = frequent_words(codebook, words)
    if not rows:
        raise ValueError("keypatch_sheet: the codebook has no keypatches")
    volumes = volumes or {}
    dims = codebook.spatial_dims
    vmin, vmax = _window(dims)
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
            patch = codebook.patches[i, 0].float().numpy()  # (*p): the CT channel, or the radiograph
            plane, _ = _plane(patch, tuple((0, side) for side in patch.shape))
            ax = axes[r, 1 + 2 * n]
            ax.imshow(_display(plane, dims), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{kp.subject}\n{kp.score:.2f}", color=_FG, fontsize=6, pad=2)
            if kp.subject in volumes:
                _context(axes[r, 2 + 2 * n], np.asarray(volumes[kp.subject][0]), kp.box, vmin, vmax)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _context(ax, image: np.ndarray, box: Box, vmin: float, vmax: float) -> None:
    """A crop of `image` (*S: a CT channel or a radiograph) around `box`, in the plane `_plane` shows,
    with the box outlined."""
    plane, (a, b) = _plane(image, box)
    half = CONTEXT_PATCHES * (a[1] - a[0]) // 2
    lo = [
        max(0, min((s + e) // 2 - half, n - 2 * half)) for (s, e), n in zip((a, b), plane.shape, strict=True)
    ]
    hi = [min(n, s + 2 * half) for s, n in zip(lo, plane.shape, strict=True)]
    crop = np.asarray(plane[lo[0] : hi[0], lo[1] : hi[1]], dtype=np.float32)  # (rows, columns) of the plane
    inside = np.zeros(crop.shape, bool)
    inside[a[0] - lo[0] : a[1] - lo[0], b[0] - lo[1] : b[1] - lo[1]] = True
    dims = image.ndim
    ax.imshow(_display(crop, dims), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    rows, cols = np.nonzero(_display(inside, dims))  # the box where the display put it
    corner, size = (
        (cols.min() - 0.5, rows.min() - 0.5),
        (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1),
    )
    ax.add_patch(Rectangle(corner, *size, fill=False, edgecolor=_BOX, linewidth=0.8))


def write_keypatch_sheet(
    path: str | os.PathLike,
    codebook: Codebook,
    volumes: Mapping[str, np.ndarray] | None = None,
    words: int = 8,
    per_word: int = 6,
) -> None:
    """Render `keypatch_sheet` to a PNG file (atomically)."""
    save_png(path, keypatch_sheet(codebook, volumes, words, per_word))
