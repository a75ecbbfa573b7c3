"""What the measures need from a chest CT that the segmentation backends do not give, by classical image
processing (HU windows, masked smoothing, morphology; no learned models).

- `water_mean`: the HU of each voxel averaged over its water/soft-tissue neighbours only (a masked,
  normalised Gaussian), so lung, fat and bone next to a voxel do not pull its value: fluid (0-20 HU) and
  soft tissue (35-60 HU) then separate despite CT noise, and their borders with lung stay sharp.
- `pleural_fluid`: water-density collections in contact with the lungs (pleural effusion), told from the
  liver, spleen, heart and chest-wall muscle by density, from the CSF and other fluid by lung contact.
- `pleural_contents`: the lungs plus pleural fluid; its transverse extent on an axial level is the inner
  thoracic width (lungs fill the bony thorax laterally, fluid replaces them where present).
- `slice_hull`: per axial slice, the convex hull of the pleural contents: the inner thoracic outline, with
  the mediastinum in it.
- `heart`: the largest blood-density blob inside the thorax after a morphological opening that cuts off
  the great vessels (aorta, pulmonary trunk) and pulmonary vessels.
- `nodules`: compact solid lesions in the lungs, told from vessels by an opening and a ball-likeness test.

All sizes are in millimetres and turned into voxels with the volume's spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

_CONN = ndimage.generate_binary_structure(3, 1)


@dataclass
class ThoraxParams:
    """HU windows (HU) and sizes (mm) of the classical thorax segmentation."""

    water_range: tuple[float, float] = (-45.0, 100.0)  # raw HU of fluid and soft tissue (no fat, bone)
    water_sigma_mm: float = 2.0  # smoothing of the masked mean for the fluid/soft-tissue split
    fluid_max_hu: float = 25.0  # fluid 0-20 HU; spleen, muscle, blood, liver 35-60 HU
    fluid_min_ml: float = 2.0
    airway_wall_mm: float = 4.0
    lung_contact_hu: float = -200.0  # aerated lung and compressive atelectasis next to the fluid
    # lung contact (voxels) per fluid voxel, per mm of voxel size: a fluid layer touches lung over its whole
    # extent, so contact / volume in voxels goes as voxel size / thickness (0.005: layers up to 200 mm)
    lung_contact_per_mm: float = 0.005
    # on voxels coarser than this (mm) the chest wall's partial volume with lung reads as a water-density
    # layer over every lung surface (a litre at 8 mm): fluid thinner than two voxels is dropped (an opening)
    coarse_voxel_mm: float = 5.0
    blood_range: tuple[float, float] = (37.0, 51.0)  # blood (about 40-45 HU), between spleen and liver
    blood_sigma_mm: float = 5.0
    heart_open_mm: float = 10.0  # wider than the SVC and pulmonary arteries, narrower than the heart
    heart_margin_mm: float = 8.0  # the opening also sees blood this far outside the outline, then is clipped
    heart_edge_neighbours: int = 3  # tissue with this many blood face neighbours is blood (noisy border)
    thorax_window_mm: float = 20.0  # the thorax around the heart: pleural contents within this height
    solid_hu: float = -150.0  # nodules and vessels are soft tissue in aerated lung
    nodule_open_mm: tuple[float, ...] = (2.5, 4.0, 6.0, 8.0)  # opening radii tried (at least one voxel)
    nodule_max_excess: float = 2.2  # volume over the volume of the largest inscribed ball
    nodule_max_elongation: float = 2.0  # sqrt of the largest over the smallest inertia eigenvalue
    nodule_min_diameter_mm: float = 12.0  # and 3 voxels: smaller lesions are not told from vessel forks


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis, from the affine's column norms."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def world_x(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World x (mm, RAS+: negative on the patient's left) of every voxel, broadcastable to `shape`."""
    a = np.asarray(affine, float)
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape[:3])
    return (a[0, 0] * i[:, None, None] + a[0, 1] * j[None, :, None] + a[0, 2] * k[None, None, :]) + a[0, 3]


def water_mean(
    hu: np.ndarray,
    spacing: np.ndarray,
    params: ThoraxParams,
    sigma_mm: float,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Mean HU over the water/soft-tissue neighbours of each voxel (NaN outside that class or in `exclude`)."""
    lo, hi = params.water_range
    water = (hu > lo) & (hu < hi)
    if exclude is not None:
        water &= ~exclude
    sigma = sigma_mm / spacing
    weight = ndimage.gaussian_filter(water.astype(np.float32), sigma, truncate=2.5)
    total = ndimage.gaussian_filter(np.where(water, hu, 0.0).astype(np.float32), sigma, truncate=2.5)
    out = np.full(hu.shape, np.nan, np.float32)
    out[water] = total[water] / np.maximum(weight[water], 1e-6)
    return out


def pleural_fluid(
    hu: np.ndarray, spacing: np.ndarray, airway: np.ndarray, params: ThoraxParams | None = None
) -> np.ndarray:
    """Pleural effusion: water-density components touching aerated or atelectatic lung (bool).

    Voxels within `airway_wall_mm` of the `airway` lumen (its water-density wall) are not fluid; on grids
    coarser than `coarse_voxel_mm`, neither are layers thinner than two voxels (chest-wall partial volume).
    """
    params = params or ThoraxParams()
    mean = water_mean(hu, spacing, params, params.water_sigma_mm)
    candidate = mean < params.fluid_max_hu  # NaN compares False
    labels, n = ndimage.label(candidate, structure=_CONN)
    if n == 0:
        return candidate
    lung_side = ndimage.binary_dilation(hu < params.lung_contact_hu, structure=_CONN)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    contact = np.bincount(labels[lung_side].ravel(), minlength=n + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    voxel_mm = float(np.prod(spacing)) ** (1.0 / 3.0)
    keep = (sizes * voxel_ml >= params.fluid_min_ml) & (
        contact >= np.maximum(5, params.lung_contact_per_mm * voxel_mm * sizes)
    )
    keep[0] = False
    fluid = keep[labels]
    if voxel_mm > params.coarse_voxel_mm:
        fluid = ndimage.binary_opening(fluid, structure=ndimage.generate_binary_structure(3, 1))
    if airway.any():  # the bronchial wall is water-dense and touches lung: never fluid (judged after the
        # contact test, since bronchi cut off by an effusion end at its surface, where its lung contact is)
        wall = max(params.airway_wall_mm, 1.01 * float(spacing.max()))
        fluid &= ndimage.distance_transform_edt(~airway, sampling=spacing) > wall
        labels, n = ndimage.label(fluid, structure=_CONN)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        big = sizes * voxel_ml >= params.fluid_min_ml
        big[0] = False
        fluid = big[labels]
    return fluid


def pleural_contents(lungs: np.ndarray, fluid: np.ndarray) -> np.ndarray:
    """Lungs and pleural fluid with the thin gaps between them closed (atelectasis, fissures)."""
    both = lungs | fluid
    return ndimage.binary_closing(both, structure=_CONN, iterations=2) | both


def slice_hull(mask: np.ndarray) -> np.ndarray:
    """Per axial slice, the convex hull of the `mask` voxels (bool, same shape).

    From the pleural contents this is the inner thoracic outline with the mediastinum: the heart's front,
    where a large heart pushes the lungs aside, is inside it too.
    """
    out = np.zeros(mask.shape, bool)
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        out[:, :, k] = _convex_fill(mask[:, :, k])
    return out


def _convex_fill(m: np.ndarray) -> np.ndarray:
    """The voxels of a 2-D grid inside the convex hull of the True voxels of `m` (X, Y)."""
    rows = np.flatnonzero(m.any(axis=0))
    first = np.argmax(m[:, rows], axis=0)
    last = m.shape[0] - 1 - np.argmax(m[::-1, rows], axis=0)
    points = np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)]).astype(float)
    try:
        equations = ConvexHull(points).equations  # (F, 3): a x + b y + c <= 0 inside
    except QhullError:  # a line or a point: its own extent per row
        out = np.zeros_like(m)
        for j, lo, hi in zip(rows, first, last, strict=True):
            out[lo : hi + 1, j] = True
        return out
    x, y = np.arange(m.shape[0], dtype=float), np.arange(m.shape[1], dtype=float)
    inside = np.ones(m.shape, bool)
    for a, b, c in equations:
        inside &= a * x[:, None] + b * y[None, :] + c <= 1e-6
    return inside


def _ball_open(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological opening with a ball of `radius_mm` (by distance transforms, any spacing)."""
    core = ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm
    if not core.any():
        return core
    return (ndimage.distance_transform_edt(~core, sampling=spacing) <= radius_mm) & mask


def heart(
    hu: np.ndarray,
    spacing: np.ndarray,
    thorax: np.ndarray,
    fluid: np.ndarray,
    params: ThoraxParams | None = None,
) -> np.ndarray:
    """The heart: the largest blood-density blob inside `thorax` (per-slice hull of the pleural contents);
    `fluid` (pleural) is left out of the averaging so that it does not darken the heart's border.

    The opening that cuts off the great and pulmonary vessels runs on blood up to `heart_margin_mm`
    outside the outline, so that a large heart reaching the chest wall is not cut into thin wedges that
    the opening would drop, and is clipped to the outline afterwards (the chest wall has blood density).
    Nothing is regrown after the opening: a regrowth takes in the vessels along the heart's border.
    """
    params = params or ThoraxParams()
    window = 1 + 2 * int(round(params.thorax_window_mm / spacing[2]))
    thorax = ndimage.maximum_filter1d(thorax, window, axis=2)  # the heart may push the lungs aside
    out = np.zeros(hu.shape, bool)
    if not thorax.any():
        return out
    near = ndimage.distance_transform_edt(~thorax, sampling=spacing) <= params.heart_margin_mm
    box = ndimage.find_objects(near.astype(np.uint8))[0]
    mean = water_mean(hu[box], spacing, params, params.blood_sigma_mm, fluid[box])
    lo, hi = params.blood_range
    blood = ndimage.binary_fill_holes((mean >= lo) & (mean <= hi) & near[box])
    tissue = (hu[box] > params.water_range[0]) & (hu[box] < params.water_range[1]) & near[box] & ~fluid[box]
    blood = _close_border(blood, tissue, params.heart_edge_neighbours)
    opened = _ball_open(blood, params.heart_open_mm, spacing) & thorax[box]
    labels, n = ndimage.label(opened, structure=_CONN)
    if n == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    out[box] = labels == 1 + int(np.argmax(sizes))
    return out


def _close_border(blood: np.ndarray, tissue: np.ndarray, neighbours: int, steps: int = 2) -> np.ndarray:
    """`blood` with the `tissue` voxels that have at least `neighbours` blood face neighbours added, twice:
    border voxels averaged over few neighbours fall out of the blood window by noise alone."""
    cross = _CONN.astype(np.uint8)
    for _ in range(steps):
        count = ndimage.convolve(blood.astype(np.uint8), cross, mode="constant")
        blood = blood | (tissue & (count >= neighbours))
    return blood


def cardiothoracic_widths(heart: np.ndarray, contents: np.ndarray) -> tuple[int, int]:
    """(heart width, inner thoracic width) in voxels on the axial slice where the CTR is read.

    That slice is the one of widest heart among the slices where the pleural contents flank the heart on
    both sides (the heart's lowest slices abut the liver, which shares its density: a heart grown into it
    there is wider than the thorax around it); of the slices with that width, the one with the widest
    thorax (on a coarse grid several slices tie, and the first one may be the narrow lung base). Without
    a flanked slice, every slice is a candidate. The thoracic width is that of contents | heart.
    """
    outline = contents | heart
    heart_cols, outline_cols = heart.any(axis=1), outline.any(axis=1)  # (x, z)
    levels = np.flatnonzero(heart_cols.any(axis=0))
    if not len(levels):
        return 0, 0
    rows = []  # (flanked, heart width, thorax width) per slice with heart
    for k in levels:
        hx, cx = np.flatnonzero(heart_cols[:, k]), np.flatnonzero(contents[:, :, k].any(axis=1))
        flanked = bool(len(cx)) and cx[0] < hx[0] and cx[-1] > hx[-1]
        ox = np.flatnonzero(outline_cols[:, k])
        rows.append((flanked, int(hx[-1] - hx[0] + 1), int(ox[-1] - ox[0] + 1)))
    candidates = [r for r in rows if r[0]] or rows
    _, heart_width, thorax_width = max(candidates, key=lambda r: (r[1], r[2]))
    return heart_width, thorax_width


def nodules(
    hu: np.ndarray, spacing: np.ndarray, lungs: np.ndarray, params: ThoraxParams | None = None
) -> list[np.ndarray]:
    """Compact solid lesions in `lungs`, as boolean masks (vessels and consolidation excluded).

    Solid voxels (> `solid_hu`) in the lungs are opened with balls of rising radius (`nodule_open_mm`, at
    least one voxel), which cut off vessels thinner than that; a remaining component is a
    nodule if it is ball-like: its volume is at most `nodule_max_excess` times the volume of its largest
    inscribed ball and its inertia is nearly isotropic. Lesions below `nodule_min_diameter_mm` or three
    voxels (equivalent-sphere diameter) are not reported. A lesion found at one radius is not reported
    again at a larger one.
    """
    params = params or ThoraxParams()
    box = ndimage.find_objects(lungs.astype(np.uint8))
    if not box:
        return []
    box = box[0]
    solid = (hu[box] > params.solid_hu) & lungs[box]
    depth = ndimage.distance_transform_edt(solid, sampling=spacing)
    min_d = max(params.nodule_min_diameter_mm, 3.0 * float(spacing.max()))
    taken = np.zeros(solid.shape, bool)
    found = []
    for radius in sorted({max(r, float(spacing.max())) for r in params.nodule_open_mm}):
        core = depth > radius
        if not core.any():
            break
        opened = (ndimage.distance_transform_edt(~core, sampling=spacing) <= radius) & solid
        labels, _ = ndimage.label(opened, structure=_CONN)
        for index, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            part = labels[sl] == index
            if (taken[sl] & part).any() or not _ball_like(part, depth[sl], spacing, min_d, params):
                continue
            taken[sl] |= part
            mask = np.zeros(hu.shape, bool)
            mask[box][sl] = part
            found.append(mask)
    return found


def _ball_like(
    part: np.ndarray, depth: np.ndarray, spacing: np.ndarray, min_d: float, params: ThoraxParams
) -> bool:
    """Large enough, not much more volume than its largest inscribed ball, and nearly isotropic."""
    volume = part.sum() * float(np.prod(spacing))
    if (6.0 * volume / np.pi) ** (1.0 / 3.0) < min_d:
        return False
    inscribed = float(depth[part].max()) - 0.5 * float(spacing.min())
    if volume > params.nodule_max_excess * 4.0 / 3.0 * np.pi * max(inscribed, 1e-3) ** 3:
        return False
    points = np.argwhere(part) * spacing
    eig = np.linalg.eigvalsh(np.cov(points.T) + np.eye(3) * float(spacing.max()) ** 2 / 12.0)
    return bool(np.sqrt(eig[-1] / eig[0]) <= params.nodule_max_elongation)
