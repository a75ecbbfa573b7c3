"""Sampling grid and tube rasterisation shared by the phantom's anatomy and pathology.

All geometry is defined in world millimetres (RAS+, origin at the volume centre, as in
`medsyn.data.nifti.spacing_affine`), so one seed gives the same anatomy at any grid size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A cubic voxel grid of `size`^3 voxels at `spacing` mm, centred on the world origin."""

    size: int
    spacing: float

    @property
    def axis(self) -> np.ndarray:
        """World coordinate (mm) of the voxel centres along any axis, shape (size,)."""
        return ((np.arange(self.size) - (self.size - 1) / 2.0) * self.spacing).astype(np.float32)

    @property
    def xyz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates: x (S,1,1), y (1,S,1), z (1,1,S), in mm."""
        a = self.axis
        return a[:, None, None], a[None, :, None], a[None, None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.size)

    @property
    def voxel_ml(self) -> float:
        return self.spacing**3 / 1000.0

    def index(self, mm: np.ndarray) -> np.ndarray:
        """World mm -> fractional voxel index."""
        return np.asarray(mm) / self.spacing + (self.size - 1) / 2.0


@dataclass
class Tubes:
    """Straight tube segments from `a` to `b` (N, 3) mm with radii `ra`, `rb` (N,) mm.

    `parent` (N,) gives each segment's parent index (-1 for a root), so a tree can be pruned
    without breaking its connectivity.
    """

    a: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    parent: np.ndarray

    @staticmethod
    def empty() -> Tubes:
        z3, z1 = np.zeros((0, 3)), np.zeros(0)
        return Tubes(z3, z3.copy(), z1, z1.copy(), np.zeros(0, dtype=np.int64))

    @staticmethod
    def polyline(points: np.ndarray, radii: np.ndarray) -> Tubes:
        """A chain of segments through `points` (M, 3) with per-point radii (M,)."""
        points, radii = np.asarray(points, float), np.asarray(radii, float)
        n = len(points) - 1
        return Tubes(points[:-1], points[1:], radii[:-1], radii[1:], np.arange(n) - 1)

    def __len__(self) -> int:
        return len(self.a)

    def concat(self, other: Tubes) -> Tubes:
        off = len(self)
        parent = np.where(other.parent >= 0, other.parent + off, -1)
        return Tubes(
            np.concatenate([self.a, other.a]),
            np.concatenate([self.b, other.b]),
            np.concatenate([self.ra, other.ra]),
            np.concatenate([self.rb, other.rb]),
            np.concatenate([self.parent, parent]),
        )

    def subset(self, keep: np.ndarray) -> Tubes:
        """Keep segments where `keep` is true; a segment whose parent is dropped is dropped too."""
        keep = np.asarray(keep, bool).copy()
        for i in range(len(self)):  # parents always precede children
            if self.parent[i] >= 0 and not keep[self.parent[i]]:
                keep[i] = False
        new_index = np.cumsum(keep) - 1
        parent = np.where(self.parent[keep] >= 0, new_index[np.maximum(self.parent[keep], 0)], -1)
        return Tubes(self.a[keep], self.b[keep], self.ra[keep], self.rb[keep], parent)

    def scaled(self, factor: float, add_mm: float = 0.0) -> Tubes:
        """The same centrelines with radii `r * factor + add_mm` (e.g. an airway's outer wall)."""
        return Tubes(self.a, self.b, self.ra * factor + add_mm, self.rb * factor + add_mm, self.parent)

    def resolvable(self, spacing: float, min_fraction: float = 0.5) -> Tubes:
        """Drop segments thinner than `min_fraction` voxels of radius and widen the rest to at
        least half a voxel diagonal, so that a drawn tree stays 26-connected at any spacing."""
        kept = self.subset(np.maximum(self.ra, self.rb) >= min_fraction * spacing)
        floor = 0.5 * np.sqrt(3.0) * spacing
        return Tubes(kept.a, kept.b, np.maximum(kept.ra, floor), np.maximum(kept.rb, floor), kept.parent)


def _segment_distance(px, py, pz, a: np.ndarray, b: np.ndarray):
    """Distance from points to the segment a-b and the position t in [0, 1] of the nearest point."""
    d = b - a
    length2 = float(d @ d)
    dx, dy, dz = px - a[0], py - a[1], pz - a[2]
    if length2 < 1e-12:
        t = np.zeros(np.broadcast_shapes(np.shape(dx), np.shape(dy), np.shape(dz)), np.float32)
    else:
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / length2, 0.0, 1.0)
    ex, ey, ez = dx - t * d[0], dy - t * d[1], dz - t * d[2]
    return np.sqrt(ex * ex + ey * ey + ez * ez), t


def rasterize_tubes(grid: Grid, tubes: Tubes, grow: float = 0.0, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the voxels whose centre lies within `radius + grow` mm of a tube's axis.

    Each segment is evaluated only in its bounding box; a mask (zero-initialised, so cheap to
    allocate) rather than a distance map keeps 256^3 grids fast.
    """
    if out is None:
        out = np.zeros(grid.shape, dtype=bool)
    axis = grid.axis
    for a, b, ra, rb in zip(tubes.a, tubes.b, tubes.ra, tubes.rb, strict=True):
        a, b, ra, rb = a.astype(np.float32), b.astype(np.float32), float(ra) + grow, float(rb) + grow
        r = max(ra, rb)
        lo = np.floor(grid.index(np.minimum(a, b) - r)).astype(int)
        hi = np.ceil(grid.index(np.maximum(a, b) + r)).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, grid.size)
        if np.any(hi <= lo):
            continue
        xs = axis[lo[0] : hi[0], None, None]
        ys = axis[None, lo[1] : hi[1], None]
        zs = axis[None, None, lo[2] : hi[2]]
        dist, t = _segment_distance(xs, ys, zs, a, b)
        view = out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        view |= dist < ra + t * (rb - ra)
    return out


def tube_clearance_points(points: np.ndarray, tubes: Tubes) -> np.ndarray:
    """Signed clearance (mm) of world points (N, 3) to the nearest tube surface."""
    best = np.full(len(points), np.inf)
    for a, b, ra, rb in zip(tubes.a, tubes.b, tubes.ra, tubes.rb, strict=True):
        dist, t = _segment_distance(points[:, 0], points[:, 1], points[:, 2], a, b)
        np.minimum(best, dist - (ra + t * (rb - ra)), out=best)
    return best


def unit(v: np.ndarray) -> np.ndarray:
    """Normalise vectors along the last axis."""
    v = np.asarray(v, float)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
