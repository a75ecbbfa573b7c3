"""Slice previews of a CT volume with lobe, airway and vessel outlines, as RGB arrays or PNG files.

One renderer for every picture the project makes: training previews logged to W&B, `preview.png`
beside each sample and the phantom generator's checks.

Orientation. Volumes are RAS+ arrays as in nibabel, MONAI `Orientation("RAS")` and
`medsyn.data.nifti.spacing_affine`: index [i, j, k] grows towards the patient's Right, Anterior and
Superior. (Pass a 4x4 affine as `spacing` and any other orientation is brought to RAS first.)
Views follow the radiological convention:

    axial    (fixed k): patient right on the viewer's LEFT, anterior up     (edges R | L, A / P)
    coronal  (fixed j): patient right on the viewer's LEFT, superior up     (edges R | L, S / I)
    sagittal (fixed i): anterior on the viewer's LEFT,      superior up     (edges A | P, S / I)

so a marker at the patient's left-anterior-superior corner shows top-right (axial, coronal) and
top-left (sagittal). Pixels keep the physical aspect ratio of the voxel spacing.

Planes. By default three axial levels spanning the lungs (upper, middle, lower) and a coronal and a
sagittal plane through them, chosen from the volume by `choose_slices` so that a finding such as a
pleural effusion at the lung base is in view; a caller's `slices` win.

Layout: a title line, then two rows of panels (the axial levels from superior to inferior, coronal,
sagittal): the CT alone on top, the same CT with the masks drawn as thin outlines below (lobe borders in
the lobe colours, airway and vessel outlines; no fill, so the CT stays readable), and a colour legend.
Without masks there is a single row. Rendering uses `matplotlib.figure.Figure` with the Agg canvas
directly; pyplot's global state and backend are never touched. The output size depends only on `panel`,
the number of axial levels (three unless `slices` names them), the masks given and the title.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from medsyn.data.channels import CHANNELS, LOBE_NAMES, decode_volume
from medsyn.io import atomic_path

WINDOWS: dict[str, tuple[float, float]] = {
    "full": (-1024.0, 600.0),  # the training window
    "lung": (-1350.0, 150.0),
    "mediastinum": (-160.0, 240.0),
}
# left lung in cool colours, right lung in warm ones; airway cyan, vessels red
LOBE_COLORS = {1: "#3d8fe0", 2: "#a070e0", 3: "#ff8c1a", 4: "#e6d21e", 5: "#3cc24a"}
MASK_COLORS = {"airway": "#2ee6ff", "vessels": "#ff3030"}
EXTRA_COLORS = ("#ff66cc", "#b8865c", "#ffffff", "#7fffd4")
VIEWS = ("axial", "coronal", "sagittal")
_EDGES = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}  # left, right, top, bottom
_DPI = 100
_BG, _FG = "#101010", "#e8e8e8"
LOBE_WIDTH, MASK_WIDTH = 0.9, 0.6  # outline widths in points (1 pt = 1.4 px)

# choose_slices: what the lungs and the findings are, and where the axial levels go by default
AXIAL_LEVELS = (
    0.8,
    0.5,
    0.25,
)  # default axial levels, superior first: share of the lungs' extent above the base
LUNG_HU = -400.0  # air-density lung when no lobes are given
DENSE_HU = -300.0  # non-aerated lung: consolidation, masses, atelectasis
FINDING_AREA = 0.03  # a finding moves an axial level from this share of the largest lung cross-section
FLUID_HU = (-20.0, 35.0)  # pleural fluid after in-plane smoothing (water 0-20 HU; liver, muscle ~50 HU)
_GRID = 96  # slices are chosen on every s-th voxel, at most this many per axis
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[:, :, 1] = True  # 8-connected within an axial slice, never across

ArrayLike = np.ndarray | torch.Tensor


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255.0


def _orient(vol: np.ndarray, spacing: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the volume as a RAS view (no copy) and its voxel spacing; `spacing` may be an affine."""
    sp = np.asarray(_numpy(spacing), dtype=np.float64)
    if sp.shape == (4, 4):
        import nibabel.orientations as nio  # only needed for affines

        ornt = nio.ornt_transform(nio.io_orientation(sp), nio.axcodes2ornt("RAS"))
        vol = nio.apply_orientation(vol, ornt)
        sp = np.linalg.norm(sp[:3, :3], axis=0)[ornt[:, 0].astype(int).argsort()]
    sp = np.broadcast_to(sp, (3,)) if sp.size in (1, 3) else None
    if sp is None or not np.all(sp > 0):
        raise ValueError(f"spacing must be 3 positive numbers or a 4x4 affine, got {spacing!r}")
    return vol, sp


def _planes(vol: np.ndarray, i: int, j: int, ks: Sequence[int]) -> list[np.ndarray]:
    """Display-ready 2-D planes: axial at each level of `ks`, then coronal at `j` and sagittal at `i`."""
    axial = [vol[..., :, :, k] for k in ks]  # (..., I, J) each
    planes = [*axial, vol[..., :, j, :], vol[..., i, :, :]]  # then (..., I, K), (..., J, K)
    # both in-plane axes reversed then transposed: rows run A->P or S->I, columns R->L or A->P
    return [np.swapaxes(p[..., ::-1, ::-1], -1, -2) for p in planes]


def _check_volume(name: str, x: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"{name} must be a 3-D volume (I, J, K), got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"mask {name!r} has shape {tuple(x.shape)}, expected the CT's {shape}")


def _binary_colors(masks: Mapping[str, np.ndarray]) -> dict[str, str]:
    extras = iter(EXTRA_COLORS * 4)
    return {n: MASK_COLORS.get(n) or next(extras) for n in masks if n != "lobes"}


def choose_slices(
    ct_hu: ArrayLike, lobes: ArrayLike | None = None, vessels: ArrayLike | None = None
) -> tuple[int, int, tuple[int, ...]]:
    """The planes a preview shows by default: (i of the sagittal, j of the coronal, axial levels k from
    superior to inferior) of a RAS volume in HU, so that the lungs and their largest finding are in view.

    Lungs: `lobes` > 0 when given and not empty, else air-density voxels (< `LUNG_HU`) enclosed by the
    body in their axial slice. Their extent runs from the base k0 to the apex k1 (the levels holding at
    least 5% of the largest lung cross-section). Axial levels by default at `AXIAL_LEVELS` of the way
    from k0 to k1: upper lobes, hila, and the lung bases above the diaphragm's dome, where an effusion
    collects. Findings: non-aerated voxels (> `DENSE_HU`) within the lungs, outside `vessels` when given
    (consolidation, masses), and fluid-density voxels (`FLUID_HU`, smoothed in-plane) in the dependent
    (posterior) half of the chest below lung tissue (pleural fluid fills the pleural space from the
    bottom and back of the lung), left after an in-plane opening that drops vessels and thin walls. The
    level with the most finding voxels, searched from 10% of the extent up (lower, the diaphragm's dome
    looks the same), replaces the default level of its third of the extent when they cover at least
    `FINDING_AREA` of the largest lung cross-section. Coronal: through the lungs' antero-posterior
    centroid. Sagittal: through the centroid of the right lung, not the midline, or of the left one when
    a finding moved a level and the left has more finding voxels. Without lungs: the same fractions of
    the whole volume and its middle planes. Chosen on every s-th voxel (at most 96 per axis), so a 256^3
    volume stays fast.
    """
    ct = _numpy(ct_hu)
    _check_volume("ct", ct)
    s = _step(ct.shape)
    masks = {"lobes": lobes, "vessels": vessels}
    for name, m in masks.items():
        if m is not None:
            masks[name] = _numpy(m)
            _check_volume(name, masks[name], ct.shape)
            masks[name] = masks[name][::s, ::s, ::s]
    return _choose(ct[::s, ::s, ::s], masks["lobes"], masks["vessels"], s, ct.shape)


def _step(shape: Sequence[int]) -> int:
    return max(1, -(-max(shape) // _GRID))


def _choose(
    ct: np.ndarray, lobes: np.ndarray | None, vessels: np.ndarray | None, step: int, shape: Sequence[int]
) -> tuple[int, int, tuple[int, ...]]:
    """`choose_slices` on every `step`-th voxel (`ct`, `lobes`, `vessels`) of a volume of `shape`."""
    ct = ct.astype(np.float32)
    lung = lobes > 0 if lobes is not None and (lobes > 0).any() else _air_lungs(ct)
    area = lung.sum((0, 1))  # (K,)
    if not area.any():
        ks = [round(f * (ct.shape[2] - 1)) for f in AXIAL_LEVELS]
        return _full(ct.shape[0] // 2, ct.shape[1] // 2, ks, step, shape)
    k0, k1 = np.flatnonzero(area >= 0.05 * area.max())[[0, -1]]
    ks = [round(k0 + f * (k1 - k0)) for f in AXIAL_LEVELS]  # upper, middle, lower
    i_mid, j_mid = (np.nonzero(lung)[a].mean() for a in (0, 1))
    finding = _findings(ct, lung, vessels, j_mid)
    finding[..., : k0 + int(np.ceil(0.1 * (k1 - k0)))] = False
    finding[..., k1 + 1 :] = False
    score = finding.sum((0, 1))  # (K,)
    k = int(score.argmax())
    right = np.arange(ct.shape[0])[:, None, None] >= i_mid  # RAS: i grows to the patient's right
    side = right
    if score[k] >= FINDING_AREA * area.max():
        third = min(2, int(3 * (k - k0) / max(k1 - k0, 1)))  # 0 lower, 1 middle, 2 upper
        ks[2 - third] = k
        side = right if (finding & right).sum() >= (finding & ~right).sum() else ~right
    i = np.nonzero(lung & side)[0].mean() if (lung & side).any() else i_mid
    return _full(i, j_mid, ks, step, shape)


def _full(
    i: float, j: float, ks: Sequence[float], step: int, shape: Sequence[int]
) -> tuple[int, int, tuple[int, ...]]:
    """Indices on the every-`step`-th grid -> indices of the full volume."""
    at = [min(round(v) * step, n - 1) for v, n in ((i, shape[0]), (j, shape[1]))]
    return at[0], at[1], tuple(min(round(k) * step, shape[2] - 1) for k in ks)


def _air_lungs(ct: np.ndarray) -> np.ndarray:
    """Air-density voxels not connected to the edge of their axial slice (outside air): the lungs."""
    labels, _ = ndimage.label(ct < LUNG_HU, structure=_IN_PLANE)
    outside = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
    return (labels > 0) & ~np.isin(labels, outside)


def _findings(ct: np.ndarray, lung: np.ndarray, vessels: np.ndarray | None, j_mid: float) -> np.ndarray:
    """Non-aerated lung and dependent pleural fluid (bool), see `choose_slices`."""
    smooth = ndimage.uniform_filter(ct, size=(3, 3, 1))
    dense = ndimage.binary_fill_holes(lung, _IN_PLANE) & (smooth > DENSE_HU)
    if vessels is not None:
        dense &= vessels == 0
    below = np.logical_or.accumulate(lung[..., ::-1], axis=2)[..., ::-1]  # lung here or at a level above
    fluid = below & ~lung & (smooth >= FLUID_HU[0]) & (smooth <= FLUID_HU[1])
    fluid[:, int(np.ceil(j_mid)) :] = False  # the dependent half: posterior (low j) when supine
    return ndimage.binary_opening(dense | fluid, np.ones((3, 3, 1), bool))


def _resolve(
    slices: Sequence | None, shape: Sequence[int], auto: Callable[[], tuple[int, int, tuple[int, ...]]]
) -> tuple[int, int, tuple[int, ...]]:
    """The caller's (i, j, k or levels) with None entries from `auto()`, checked against `shape`."""
    given = list(slices) if slices is not None else [None] * 3
    if len(given) != 3:
        raise ValueError(f"slices must be (i, j, k), got {slices!r}")
    chosen = auto() if any(s is None for s in given) else (None, None, None)
    i, j = (int(s) if s is not None else c for s, c in zip(given[:2], chosen[:2], strict=True))
    ks = chosen[2] if given[2] is None else tuple(int(k) for k in np.atleast_1d(given[2]))
    if not ks or any(not 0 <= s < n for s, n in [(i, shape[0]), (j, shape[1])] + [(k, shape[2]) for k in ks]):
        raise ValueError(f"slices {(i, j, ks)} out of range for a volume of shape {tuple(shape)}")
    return i, j, ks


def render_preview(
    ct_hu: ArrayLike,
    masks: Mapping[str, ArrayLike] | None = None,
    spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0),
    title: str | None = None,
    window: tuple[float, float] | str = WINDOWS["full"],
    slices: Sequence[int | Sequence[int] | None] | None = None,
    panel: int = 256,
) -> np.ndarray:
    """Axial levels, a coronal and a sagittal slice of a CT in HU, alone and with mask outlines.

    `masks`: `lobes` (labels 0..5), `airway`, `vessels` (0/1) or any other binary mask, each shaped
    like the CT (I, J, K). `spacing`: voxel size in mm (i, j, k) or a 4x4 affine. `window`: HU
    (low, high) or a name in `WINDOWS`. `slices`: the (i, j, k) the planes pass through in RAS voxels,
    k one level or a sequence of axial levels; None entries are chosen by `choose_slices` (three axial
    levels spanning the lungs, placed on the largest finding, e.g. an effusion; coronal and sagittal
    through the lungs). `panel`: panel size in pixels. Returns RGB uint8 (H, W, 3).
    """
    ct = _numpy(ct_hu)
    _check_volume("ct", ct)
    masks = {n: _numpy(m) for n, m in (masks or {}).items()}
    for name, m in masks.items():
        _check_volume(name, m, ct.shape)
    if np.issubdtype(ct.dtype, np.floating) and ct.size > 1 and -1.0 <= ct.min() < ct.max() <= 1.0:
        warnings.warn("ct lies in [-1, 1]: is it encoded? render_volume() decodes it", stacklevel=2)
    ct, sp = _orient(ct, spacing)
    masks = {n: _orient(m, spacing)[0] for n, m in masks.items()}
    i, j, ks = _resolve(slices, ct.shape, lambda: choose_slices(ct, masks.get("lobes"), masks.get("vessels")))
    mask_planes = {n: _planes(m, i, j, ks) for n, m in masks.items()}
    planes = [{n: p[c] for n, p in mask_planes.items()} for c in range(len(ks) + 2)]
    return _render(_planes(ct, i, j, ks), planes, sp, (i, j, ks), ct.shape, title, window, panel)


def render_volume(
    x: ArrayLike, spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0), **kwargs
) -> np.ndarray:
    """`render_preview` of a (4, I, J, K) array in the diffusion range (channels ct, lobes, airway,
    vessels), decoded with `decode_volume`; only the shown planes and a coarse grid for `choose_slices`
    are decoded, so 256^3 stays fast."""
    x = _numpy(x)
    if x.ndim != 4 or x.shape[0] != len(CHANNELS):
        raise ValueError(
            f"expected a ({len(CHANNELS)}, I, J, K) volume ({', '.join(CHANNELS)}), got shape {x.shape}"
        )
    x, sp = _orient(x.transpose(1, 2, 3, 0), spacing)  # channels last while reorienting
    x = np.moveaxis(x, -1, 0)
    shape = x.shape[1:]

    def auto() -> tuple[int, int, tuple[int, ...]]:
        s = _step(shape)
        coarse = decode_volume(x[:, ::s, ::s, ::s])
        return _choose(coarse["ct"], coarse["lobes"], coarse["vessels"], s, shape)

    i, j, ks = _resolve(kwargs.pop("slices", None), shape, auto)
    decoded = [decode_volume(p) for p in _planes(x, i, j, ks)]  # per panel {name: (h, w)}
    ct = [d.pop("ct") for d in decoded]
    return _render(ct, decoded, sp, (i, j, ks), shape, kwargs.pop("title", None),
                   kwargs.pop("window", WINDOWS["full"]), kwargs.pop("panel", 256), **kwargs)  # fmt: skip


HEAT_CMAP = "inferno"
HEAT_ALPHA = 0.7  # opacity of the overlay at the top of its range; it falls to 0 at the bottom
MARK_COLOR = "#39ff6a"


def render_heat(
    ct_hu: ArrayLike,
    heat: ArrayLike,
    spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0),
    title: str | None = None,
    value_range: tuple[float, float] | None = None,
    label: str = "value",
    mark: Sequence[int] | None = None,
    window: tuple[float, float] | str = WINDOWS["full"],
    panel: int = 256,
) -> np.ndarray:
    """Axial, coronal and sagittal slices through the voxel `mark` (i, j, k of the arrays as given; default
    the maximum of `heat`) of a map `heat` (I, J, K) on the CT's grid (e.g. a word's similarity), over the
    CT (I, J, K, HU) in grey, with that voxel circled.

    The map is a semi-transparent overlay whose opacity grows with its value from 0 at the bottom of
    `value_range` (default: the map's finite min..max) to `HEAT_ALPHA` at the top, so low values leave
    the CT in view; NaN voxels (no value) stay clear. A colour bar named `label` gives the scale.
    `spacing`: voxel size in mm or a 4x4 affine (any orientation is shown in RAS, as `render_preview`).
    Returns RGB uint8 (H, W, 3).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    ct, heat = _numpy(ct_hu), np.asarray(_numpy(heat), np.float32)
    _check_volume("ct", ct)
    _check_volume("heat", heat, ct.shape)
    finite = np.isfinite(heat)
    if mark is None:
        best = np.argmax(np.where(finite, heat, -np.inf)) if finite.any() else np.ravel_multi_index(
            [n // 2 for n in heat.shape], heat.shape)  # fmt: skip
        mark = np.unravel_index(int(best), heat.shape)
    if len(mark) != 3 or any(not 0 <= int(v) < n for v, n in zip(mark, heat.shape, strict=True)):
        raise ValueError(f"mark {tuple(mark)} out of range for a volume of shape {heat.shape}")
    marked = np.zeros(heat.shape, bool)
    marked[tuple(int(v) for v in mark)] = True
    ct, sp = _orient(ct, spacing)
    heat, marked, finite = (_orient(v, spacing)[0] for v in (heat, marked, finite))
    i, j, k = (int(v[0]) for v in np.nonzero(marked))  # the marked voxel in RAS order
    lo, hi = value_range or (
        (float(heat[finite].min()), float(heat[finite].max())) if finite.any() else (0.0, 1.0)
    )
    norm = Normalize(lo, hi if hi > lo else lo + 1e-6, clip=True)
    cmap = ListedColormap(colormaps[HEAT_CMAP](np.linspace(0.25, 1.0, 256)))  # without its black end
    w_lo, w_hi = WINDOWS[window] if isinstance(window, str) else window
    views = [("axial", f"k={k}/{ct.shape[2]}"), ("coronal", f"j={j}/{ct.shape[1]}"),
             ("sagittal", f"i={i}/{ct.shape[0]}")]  # fmt: skip
    # the maximum in each display plane: columns and rows as `_planes` lays them out
    marks = [(ct.shape[0] - 1 - i, ct.shape[1] - 1 - j), (ct.shape[0] - 1 - i, ct.shape[2] - 1 - k),
             (ct.shape[1] - 1 - j, ct.shape[2] - 1 - k)]  # fmt: skip
    aspects = {"axial": sp[1] / sp[0], "coronal": sp[2] / sp[0], "sagittal": sp[2] / sp[1]}
    pad, head, bar = 6, 22, 54
    width = pad + 3 * (panel + pad)
    lines = textwrap.wrap(title, max(20, int(width / 7.2)))[:3] if title else []
    top = 8 + 16 * len(lines)
    height = top + head + panel + bar
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=_BG)
    FigureCanvasAgg(fig)
    if lines:
        fig.text(0.5, 1 - 6 / height, "\n".join(lines), ha="center", va="top", color=_FG, fontsize=10)
    y0 = height - top - head - panel
    for c, (ct_plane, heat_plane, (view, where), (x, y)) in enumerate(
        zip(_planes(ct, i, j, [k]), _planes(heat, i, j, [k]), views, marks, strict=True)
    ):
        ax = fig.add_axes([(pad + c * (panel + pad)) / width, y0 / height, panel / width, panel / height])
        ax.set_facecolor("black")
        ax.set_axis_off()
        grey = np.clip((ct_plane.astype(np.float32) - w_lo) / (w_hi - w_lo), 0.0, 1.0)
        ax.imshow(np.repeat(grey[..., None], 3, axis=-1), aspect=aspects[view], interpolation="nearest",
                  resample=False)  # fmt: skip
        level = norm(np.nan_to_num(heat_plane, nan=lo)).filled(0.0)
        overlay = cmap(level)
        overlay[..., 3] = np.where(np.isfinite(heat_plane), HEAT_ALPHA * level, 0.0)
        ax.imshow(overlay, aspect=aspects[view], interpolation="nearest", resample=False)
        ax.plot([x], [y], marker="o", markersize=11, markerfacecolor="none", markeredgecolor=MARK_COLOR,
                markeredgewidth=1.4)  # fmt: skip
        ax.plot([x], [y], marker="+", markersize=5, color=MARK_COLOR, markeredgewidth=1.0)
        ax.set_title(f"{view}  {where}", color=_FG, fontsize=9, pad=3)
        _edge_labels(ax, view)
    cax = fig.add_axes([0.25, 36 / height, 0.5, 9 / height])
    colorbar = fig.colorbar(ScalarMappable(norm, cmap), cax=cax, orientation="horizontal")
    colorbar.set_label(f"{label} (circled: {float(heat[i, j, k]):.3g})", color=_FG, fontsize=8, labelpad=1)
    colorbar.ax.tick_params(colors=_FG, labelsize=7, length=2)
    colorbar.outline.set_edgecolor(_FG)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _outline(ax, planes: Mapping[str, np.ndarray]) -> None:
    """Draw lobe borders in the lobe colours and the other masks' outlines as thin lines."""
    if min(next(iter(planes.values())).shape, default=0) < 2:
        return  # a contour needs a 2 x 2 plane
    if "lobes" in planes:
        for label, color in LOBE_COLORS.items():
            if (m := planes["lobes"] == label).any():
                ax.contour(m, levels=[0.5], colors=[color], linewidths=LOBE_WIDTH)
    for name, color in _binary_colors(planes).items():
        if (m := planes[name] > 0).any():
            ax.contour(m, levels=[0.5], colors=[color], linewidths=MASK_WIDTH)


def _edge_labels(ax, view: str) -> None:
    """The patient directions at the four edges of a panel (R | L, A / P, S / I)."""
    for (x, y, ha, va), s in zip(((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
                                  (0.5, 0.99, "center", "top"), (0.5, 0.01, "center", "bottom")),
                                 _EDGES[view], strict=True):  # fmt: skip
        ax.text(x, y, s, transform=ax.transAxes, ha=ha, va=va, color="#ffd24a", fontsize=8)


def _render(ct_planes, mask_planes, sp, at, shape, title, window, panel) -> np.ndarray:
    """Draw the figure; `ct_planes`: display planes in HU (axial levels, coronal, sagittal),
    `mask_planes`: one {name: plane} per panel, `at`: (i, j, axial levels)."""
    lo, hi = WINDOWS[window] if isinstance(window, str) else window
    i, j, ks = at
    views = [("axial", f"k={k}/{shape[2]}") for k in ks]
    views += [("coronal", f"j={j}/{shape[1]}"), ("sagittal", f"i={i}/{shape[0]}")]
    names = list(mask_planes[0]) if mask_planes else []
    rows, cols = (2 if names else 1), len(views)
    pad, head, left = 6, 22, 22  # pixels: between panels, column titles, row labels
    width = left + cols * (panel + pad)
    lines = textwrap.wrap(title, max(20, int(width / 7.2)))[:3] if title else []
    top = 8 + 16 * len(lines)
    legend = 26 if names else 0
    height = top + head + rows * panel + (rows - 1) * pad + legend + pad
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=_BG)
    FigureCanvasAgg(fig)
    if lines:
        fig.text(0.5, 1 - 6 / height, "\n".join(lines), ha="center", va="top", color=_FG, fontsize=10)
    # physical aspect (row spacing / column spacing) per view
    aspects = {"axial": sp[1] / sp[0], "coronal": sp[2] / sp[0], "sagittal": sp[2] / sp[1]}
    for r in range(rows):
        y0 = height - top - head - (r + 1) * panel - r * pad
        fig.text(4 / width, (y0 + panel / 2) / height, ["CT", "CT + outlines"][r], rotation=90,
                 ha="left", va="center", color=_FG, fontsize=9)  # fmt: skip
        for c, (view, where) in enumerate(views):
            ax = fig.add_axes(
                [(left + c * (panel + pad)) / width, y0 / height, panel / width, panel / height]
            )
            ax.set_facecolor("black")
            ax.set_axis_off()
            grey = np.clip((ct_planes[c].astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
            ax.imshow(np.repeat(grey[..., None], 3, axis=-1), aspect=aspects[view], interpolation="nearest",
                      resample=False)  # fmt: skip
            if r:
                _outline(ax, mask_planes[c])
            else:
                ax.set_title(f"{view}  {where}", color=_FG, fontsize=9, pad=3)
            _edge_labels(ax, view)
    if names:
        colors = {LOBE_NAMES[k]: c for k, c in LOBE_COLORS.items()} if "lobes" in names else {}
        colors |= _binary_colors(dict.fromkeys(names))
        handles = [Line2D([], [], color=c, linewidth=2.0, label=n) for n, c in colors.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8,
                   labelcolor=_FG, handlelength=1.2, columnspacing=1.0, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def preview_grid(
    images: Sequence[np.ndarray], captions: Sequence[str] | None = None, ncols: int = 4
) -> np.ndarray:
    """Tile RGB images (e.g. one preview per prompt and seed) row by row, each over its wrapped caption.

    Tiles are padded to the largest image; captions are wrapped to the tile width (at most 4 lines).
    Returns RGB uint8 (rows * (h + caption), ncols * w, 3).
    """
    if not images:
        raise ValueError("preview_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(captions)} captions for {len(images)} images")
    images = [_numpy(im) for im in images]
    for im in images:
        if im.ndim != 3 or im.shape[-1] not in (3, 4):
            raise ValueError(f"images must be RGB(A) arrays (H, W, 3|4), got shape {im.shape}")
    images = [_to_uint8(im[..., :3]) for im in images]
    h, w = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    wrapped = [textwrap.wrap(c, max(10, int(w / 7.0)))[:4] for c in captions] if captions else []
    cap = 8 + 15 * max((len(x) for x in wrapped), default=0) if captions else 0
    width, height = ncols * w, nrows * (h + cap)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=_BG)
    FigureCanvasAgg(fig)
    for n, im in enumerate(images):
        r, c = divmod(n, ncols)
        y0 = height - (r + 1) * (h + cap)  # figimage offsets count from the bottom left
        fig.figimage(im, xo=c * w, yo=y0 + (h - im.shape[0]), origin="upper")
        if wrapped:
            fig.text((c * w + 6) / width, (y0 + h + cap - 4) / height, "\n".join(wrapped[n]),
                     ha="left", va="top", color=_FG, fontsize=9)  # fmt: skip
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _to_uint8(im: np.ndarray) -> np.ndarray:
    if im.dtype == np.uint8:
        return im
    return (np.clip(im.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: ArrayLike) -> None:
    """Write an RGB(A) image (H, W, 3|4), uint8 or float in [0, 1], to a PNG file atomically."""
    image = _numpy(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"save_png expects an image (H, W, 3|4), got shape {image.shape}")
    from matplotlib.image import imsave

    with atomic_path(path) as tmp:
        imsave(tmp, _to_uint8(image), format="png")
