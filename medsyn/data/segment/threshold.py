"""`threshold`: a classical, model-free segmenter, the offline default backend.

Body by HU and the largest component; lungs by HU inside the body (outside air never enters the
filled body); the airway by region growing from the trachea (the air column at the top centre)
with a threshold raised until the region leaks; left/right lungs as the two largest components
(split by erosion when they touch); lobes by a fissure-free geometric split in each lung's
bounding box (an oblique plane, plus a horizontal one on the right); vessels by HU in the lungs.

Input: a RAS volume (axis 0 toward the patient's right, 1 anterior, 2 superior) in HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_CONN = ndimage.generate_binary_structure(3, 1)


def largest_components(mask: np.ndarray, count: int = 1) -> list[np.ndarray]:
    """The `count` largest 6-connected components of `mask`, largest first."""
    labels, n = ndimage.label(mask, structure=_CONN)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:count]
    return [labels == (i + 1) for i in order]


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (the last axis), so enclosed lungs join the body."""
    out = np.empty_like(mask)
    for k in range(mask.shape[2]):
        out[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return out


@dataclass
class ThresholdSegmenter:
    """HU thresholds (HU) and fissure geometry (fractions of each lung's height and depth)."""

    body_hu: float = -500.0
    lung_hu: float = -400.0
    airway_hu_range: tuple[float, float, float] = (-990.0, -790.0, 10.0)  # start, stop, step
    airway_leak_ratio: float = 1.2
    airway_plateau_ratio: float = 1.1
    airway_max_fraction: float = 0.2  # of the air in the body
    airway_sigma: float = 0.0  # Gaussian smoothing (voxels) before growing, for noisy scans
    vessel_hu: float = -500.0
    # oblique fissure: w = oblique_posterior - oblique_slope * u, with u 0 posterior .. 1 anterior and
    # w 0 base .. 1 apex of the lung; the right horizontal fissure at w = horizontal. Values chosen by a
    # grid search on four development phantoms (seeds 100-103), evaluated on others (segment_dice.py).
    oblique_posterior: float = 0.7
    oblique_slope: float = 0.9
    horizontal: float = 0.45

    def __call__(
        self, hu: np.ndarray, affine: np.ndarray, lungs: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """`{lobes, airway, vessels}` as uint8 arrays; `lungs` (bool) replaces the lung search if given."""
        hu = np.asarray(hu, dtype=np.float32)
        empty = np.zeros(hu.shape, np.uint8)
        body = self.body(hu)
        air = (hu < self.lung_hu) & body
        airway = self.airway(hu, air)
        if lungs is None:
            lungs = self.lungs(air & ~airway)
        lobes = self.lobes(lungs) if lungs.any() else empty
        interior = ndimage.binary_erosion(lobes > 0, structure=_CONN)
        vessels = (hu > self.vessel_hu) & interior & ~airway
        return {"lobes": lobes, "airway": airway.astype(np.uint8), "vessels": vessels.astype(np.uint8)}

    def body(self, hu: np.ndarray) -> np.ndarray:
        """The patient: largest component above `body_hu`, holes (lungs, airway) filled per slice."""
        parts = largest_components(hu > self.body_hu)
        return fill_slices(parts[0]) if parts else np.zeros(hu.shape, bool)

    def trachea_seed(self, air: np.ndarray, smooth: np.ndarray) -> np.ndarray | None:
        """A voxel of the trachea: the darkest voxel of the air blob nearest the centre, high up."""
        slices = np.flatnonzero(air.any(axis=(0, 1)))
        if slices.size == 0:
            return None
        body_x = np.flatnonzero(air.any(axis=(1, 2)))
        centre_x = 0.5 * (body_x.min() + body_x.max())
        k = slices[-1]
        labels, n = ndimage.label(air[:, :, k])
        centroids = ndimage.center_of_mass(air[:, :, k], labels, range(1, n + 1))
        best = min(range(n), key=lambda i: abs(centroids[i][0] - centre_x)) + 1
        i, j = ndimage.minimum_position(smooth[:, :, k], labels, best)
        return np.array([i, j, k])

    def airway(self, hu: np.ndarray, air: np.ndarray) -> np.ndarray:
        """Grow from the trachea at rising thresholds; keep the last region before it leaks.

        A leak is a jump in volume (> `airway_leak_ratio` per step) after the growth has levelled off
        (a step below `airway_plateau_ratio`): the lumen is filled, so the jump is lung parenchyma.
        """
        smooth = ndimage.gaussian_filter(hu, self.airway_sigma) if self.airway_sigma > 0 else hu
        seed = self.trachea_seed(air, smooth)
        best = np.zeros(hu.shape, bool)
        if seed is None:
            return best
        limit, plateau = self.airway_max_fraction * air.sum(), False
        for threshold in np.arange(*self.airway_hu_range):
            labels, _ = ndimage.label((smooth < threshold) & air, structure=_CONN)
            if labels[tuple(seed)] == 0:
                continue
            region = labels == labels[tuple(seed)]
            ratio = region.sum() / max(best.sum(), 1)
            if region.sum() > limit or (plateau and ratio > self.airway_leak_ratio):
                break
            plateau |= best.any() and ratio < self.airway_plateau_ratio
            best, used = region, threshold
        if best.any() and self.airway_sigma > 0:  # smoothing shrinks thin lumens: take back the raw rim
            best |= ndimage.binary_dilation(best, structure=_CONN) & (hu < used) & air
        return best

    def lungs(self, air: np.ndarray) -> np.ndarray:
        """Lung voxels: the air components at least a tenth of the largest, with vessels filled in."""
        parts = largest_components(air, count=4)
        if not parts:
            return np.zeros(air.shape, bool)
        size0 = parts[0].sum()
        lungs = np.logical_or.reduce([p for p in parts if p.sum() >= 0.1 * size0])
        closed = ndimage.binary_closing(lungs, structure=_CONN, iterations=2) | lungs
        return fill_slices(closed)

    def split_left_right(self, lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) lungs: two components, separated by erosion where they touch.

        Voxels outside the two (eroded) components go to the nearer one.
        """
        if not lungs.any():
            return lungs, lungs
        box = ndimage.find_objects(lungs.astype(np.uint8))[0]
        region, mask = lungs[box], lungs[box]
        for _ in range(8):
            parts = largest_components(mask, count=2)
            if len(parts) == 2 and parts[1].sum() >= 0.2 * parts[0].sum():
                seeds = parts[0] * np.int8(1) + parts[1] * np.int8(2)
                if (seeds > 0).sum() < region.sum():
                    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
                    seeds = seeds[tuple(nearest)] * region
                a, b = np.zeros_like(lungs), np.zeros_like(lungs)
                a[box], b[box] = seeds == 1, seeds == 2
                xa, xb = np.argwhere(seeds == 1)[:, 0].mean(), np.argwhere(seeds == 2)[:, 0].mean()
                return (a, b) if xa < xb else (b, a)  # RAS: larger x is the patient's right
            mask = ndimage.binary_erosion(mask, structure=_CONN)
        xs = np.argwhere(lungs)[:, 0]
        mid = 0.5 * (xs.min() + xs.max())
        right = lungs & (np.arange(lungs.shape[0])[:, None, None] > mid)
        return lungs & ~right, right

    def lobes(self, lungs: np.ndarray) -> np.ndarray:
        """Lobe labels 1..5 by a fissure-free split of each lung in its bounding box."""
        left, right = self.split_left_right(lungs)
        lobes = np.zeros(lungs.shape, np.uint8)
        for side, mask in (("left", left), ("right", right)):
            points = np.argwhere(mask)
            if len(points) == 0:
                continue
            lo, hi = points.min(0), np.maximum(points.max(0), points.min(0) + 1)
            u = (points[:, 1] - lo[1]) / (hi[1] - lo[1])  # posterior 0 .. anterior 1
            w = (points[:, 2] - lo[2]) / (hi[2] - lo[2])  # base 0 .. apex 1
            lower = w < self.oblique_posterior - self.oblique_slope * u
            if side == "left":
                labels = np.where(lower, 2, 1)
            else:
                labels = np.where(lower, 5, np.where(w >= self.horizontal, 3, 4))
            lobes[tuple(points.T)] = labels
        return lobes
