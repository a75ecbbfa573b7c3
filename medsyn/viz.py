"""Slice previews of a CT volume with lobe, airway and vessel overlays, as RGB arrays or PNG files.

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

Layout: a title line, then two rows of three panels (axial, coronal, sagittal): the CT alone on top,
the CT with mask overlays below, and a colour legend. Without masks there is a single row.
Rendering uses `matplotlib.figure.Figure` with the Agg canvas directly; pyplot's global state and
backend are never touched. The output size depends only on `panel`, the masks given and the title.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from medsyn.data.channels import CHANNELS, LOBE_NAMES, NUM_LOBE_LABELS, decode_volume
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
LOBE_ALPHA, MASK_ALPHA = 0.38, 0.8

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


def _planes(vol: np.ndarray, ijk: Sequence[int]) -> list[np.ndarray]:
    """Three display-ready 2-D planes (axial, coronal, sagittal) through voxel `ijk`, see module doc."""
    i, j, k = ijk
    planes = [vol[..., :, :, k], vol[..., :, j, :], vol[..., i, :, :]]  # (..., I, J), (I, K), (J, K)
    # both in-plane axes reversed then transposed: rows run A->P or S->I, columns R->L or A->P
    return [np.swapaxes(p[..., ::-1, ::-1], -1, -2) for p in planes]


def _check_volume(name: str, x: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"{name} must be a 3-D volume (I, J, K), got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"mask {name!r} has shape {tuple(x.shape)}, expected the CT's {shape}")


def _overlay(grey: np.ndarray, masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """Blend lobe labels (translucent) and binary masks (near opaque) onto a grey plane."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (h, w, 3)
    if "lobes" in masks:
        lut = np.zeros((NUM_LOBE_LABELS + 1, 3), np.float32)
        for label, color in LOBE_COLORS.items():
            lut[label] = _rgb(color)
        labels = np.clip(masks["lobes"].astype(np.int64), 0, NUM_LOBE_LABELS)
        alpha = np.where(labels > 0, LOBE_ALPHA, 0.0)[..., None].astype(np.float32)
        rgb = rgb * (1 - alpha) + lut[labels] * alpha
    for name, color in _binary_colors(masks).items():
        alpha = (masks[name] > 0)[..., None] * np.float32(MASK_ALPHA)
        rgb = rgb * (1 - alpha) + _rgb(color) * alpha
    return rgb


def _binary_colors(masks: Mapping[str, np.ndarray]) -> dict[str, str]:
    extras = iter(EXTRA_COLORS * 4)
    return {n: MASK_COLORS.get(n) or next(extras) for n in masks if n != "lobes"}


def render_preview(
    ct_hu: ArrayLike,
    masks: Mapping[str, ArrayLike] | None = None,
    spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0),
    title: str | None = None,
    window: tuple[float, float] | str = WINDOWS["full"],
    slices: Sequence[int | None] | None = None,
    panel: int = 256,
) -> np.ndarray:
    """Axial, coronal and sagittal slices of a CT in HU, with and without mask overlays.

    `masks`: `lobes` (labels 0..5), `airway`, `vessels` (0/1) or any other binary mask, each shaped
    like the CT (I, J, K). `spacing`: voxel size in mm (i, j, k) or a 4x4 affine. `window`: HU
    (low, high) or a name in `WINDOWS`. `slices`: the voxel (i, j, k) the three planes pass through
    (None entries: the middle). `panel`: panel size in pixels. Returns RGB uint8 (H, W, 3).
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
    slices = list(slices) if slices is not None else [None] * 3
    ijk = [n // 2 if s is None else int(s) for s, n in zip(slices, ct.shape, strict=True)]
    if any(not 0 <= s < n for s, n in zip(ijk, ct.shape, strict=True)):
        raise ValueError(f"slices {tuple(ijk)} out of range for a volume of shape {ct.shape}")
    mask_planes = {n: _planes(m, ijk) for n, m in masks.items()}
    planes = {v: {n: p[a] for n, p in mask_planes.items()} for a, v in enumerate(VIEWS)}
    return _render(_planes(ct, ijk), planes, sp, ijk, ct.shape, title, window, panel)


def render_volume(
    x: ArrayLike, spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0), **kwargs
) -> np.ndarray:
    """`render_preview` of a (4, I, J, K) array in the diffusion range (channels ct, lobes, airway,
    vessels), decoded with `decode_volume`; only the three planes are decoded, so 256^3 stays fast."""
    x = _numpy(x)
    if x.ndim != 4 or x.shape[0] != len(CHANNELS):
        raise ValueError(
            f"expected a ({len(CHANNELS)}, I, J, K) volume ({', '.join(CHANNELS)}), got shape {x.shape}"
        )
    x, sp = _orient(x.transpose(1, 2, 3, 0), spacing)  # channels last while reorienting
    x = np.moveaxis(x, -1, 0)
    slices = kwargs.pop("slices", None) or [None] * 3
    ijk = [n // 2 if s is None else int(s) for s, n in zip(slices, x.shape[1:], strict=True)]
    decoded = [decode_volume(p) for p in _planes(x, ijk)]  # per view {name: (h, w)}
    ct = [d.pop("ct") for d in decoded]
    planes = dict(zip(VIEWS, decoded, strict=True))
    return _render(ct, planes, sp, ijk, x.shape[1:], kwargs.pop("title", None),
                   kwargs.pop("window", WINDOWS["full"]), kwargs.pop("panel", 256), **kwargs)  # fmt: skip


def _render(ct_planes, mask_planes, sp, ijk, shape, title, window, panel) -> np.ndarray:
    """Draw the figure; `ct_planes`: 3 display planes in HU, `mask_planes`: {view: {name: plane}}."""
    lo, hi = WINDOWS[window] if isinstance(window, str) else window
    names = list(next(iter(mask_planes.values()))) if mask_planes else []
    rows = 2 if names else 1
    pad, head, left = 6, 22, 22  # pixels: between panels, column titles, row labels
    width = left + 3 * (panel + pad)
    lines = textwrap.wrap(title, max(20, int(width / 7.2)))[:3] if title else []
    top = 8 + 16 * len(lines)
    legend = 26 if names else 0
    height = top + head + rows * panel + (rows - 1) * pad + legend + pad
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=_BG)
    FigureCanvasAgg(fig)
    if lines:
        fig.text(0.5, 1 - 6 / height, "\n".join(lines), ha="center", va="top", color=_FG, fontsize=10)
    # physical aspect (row spacing / column spacing) per view: axial j/i, coronal k/i, sagittal k/j
    aspects = (sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1])
    letters = "kji"
    for r in range(rows):
        y0 = height - top - head - (r + 1) * panel - r * pad
        fig.text(4 / width, (y0 + panel / 2) / height, ["CT", "CT + masks"][r], rotation=90,
                 ha="left", va="center", color=_FG, fontsize=9)  # fmt: skip
        for c, view in enumerate(VIEWS):
            ax = fig.add_axes(
                [(left + c * (panel + pad)) / width, y0 / height, panel / width, panel / height]
            )
            ax.set_facecolor("black")
            ax.set_axis_off()
            grey = np.clip((ct_planes[c].astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
            planes = mask_planes[view] if r else {}
            ax.imshow(_overlay(grey, planes), aspect=aspects[c], interpolation="nearest", resample=False)
            if "lobes" in planes:
                lab = planes["lobes"]
                for label, color in LOBE_COLORS.items():
                    if (lab == label).any():
                        ax.contour(lab == label, levels=[0.5], colors=[color], linewidths=0.9)
            if r == 0:
                idx = 2 - c
                ax.set_title(f"{view}  {letters[c]}={ijk[idx]}/{shape[idx]}", color=_FG, fontsize=9, pad=3)
            for (x, y, ha, va), s in zip(((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
                                          (0.5, 0.99, "center", "top"), (0.5, 0.01, "center", "bottom")),
                                         _EDGES[view], strict=True):  # fmt: skip
                ax.text(x, y, s, transform=ax.transAxes, ha=ha, va=va, color="#ffd24a", fontsize=8)
    if names:
        handles = [Patch(color=LOBE_COLORS[k], label=LOBE_NAMES[k]) for k in LOBE_COLORS if "lobes" in names]
        handles += [Patch(color=col, label=n) for n, col in _binary_colors(dict.fromkeys(names)).items()]
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
