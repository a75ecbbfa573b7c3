"""Tubular structures of the phantom: mediastinal vessels, the airway tree and pulmonary vessels.

Branching trees grow by territory splitting: a branch serves a cloud of points sampled in its
lung (or lobe); the cloud is split in two across its longest axis and each half gets a child
branch heading to its centroid, with Murray's law (r^3 proportional to the territory) setting
the radius. Trees therefore fill the lungs, taper, respect lobes when asked, and are defined in
millimetres only, so they look the same at every grid size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsyn.data.phantom.anatomy import LEFT, RIGHT, Anatomy
from medsyn.data.phantom.geometry import Tubes, tube_clearance_points


@dataclass
class TreeBuilder:
    """Accumulates segments with parent links; `tubes()` returns them as `Tubes`."""

    rows: list[tuple[np.ndarray, np.ndarray, float, float, int]] = field(default_factory=list)

    def add(self, a, b, ra: float, rb: float, parent: int) -> int:
        self.rows.append((np.asarray(a, float), np.asarray(b, float), float(ra), float(rb), parent))
        return len(self.rows) - 1

    def chain(self, points, radii, parent: int) -> int:
        """Add a polyline; return the index of its last segment."""
        for i in range(len(points) - 1):
            parent = self.add(points[i], points[i + 1], radii[i], radii[i + 1], parent)
        return parent

    def tubes(self) -> Tubes:
        if not self.rows:
            return Tubes.empty()
        a, b, ra, rb, parent = zip(*self.rows, strict=True)
        return Tubes(np.array(a), np.array(b), np.array(ra), np.array(rb), np.array(parent))


def mediastinal_tubes(anat: Anatomy) -> dict[str, Tubes]:
    """Trachea and main bronchi, aorta, superior vena cava, pulmonary arteries, oesophagus."""
    cx, cy, cz = anat.heart_c
    top = cz + 0.8 * anat.heart_axes[2]
    ty, kz, vy = anat.trachea_y, anat.carina_z, anat.vertebra_y
    out = {}
    air = TreeBuilder()
    carina = air.chain([(0, ty, 140.0), (0, ty, kz + 30), (0, ty, kz)], [8.5, 8.5, 8.0], -1)
    air.chain([(0, ty, kz), (RIGHT * 26, ty - 3, kz - 16)], [6.5, 6.0], carina)
    air.chain(
        [(0, ty, kz), (LEFT * 22, ty - 3, kz - 14), (LEFT * 36, ty - 6, kz - 26)], [6.0, 5.6, 5.4], carina
    )
    out["central_airway"] = air.tubes()
    ao_y = vy + 24.0
    aorta = [
        (RIGHT * 6, cy + 4, top - 12), (RIGHT * 8, cy + 2, kz + 18), (RIGHT * 2, cy - 6, kz + 34),
        (LEFT * 12, ty + 2, kz + 38), (LEFT * 20, ao_y + 4, kz + 28), (LEFT * 21, ao_y, kz - 10),
        (LEFT * 17, ao_y + 2, -140.0),
    ]  # fmt: skip
    out["aorta"] = Tubes.polyline(np.array(aorta), np.array([13.0, 13.0, 12.0, 11.5, 11.0, 10.5, 10.0]))
    svc = [(RIGHT * 24, cy - 6, 140.0), (RIGHT * 23, cy - 4, kz + 10), (RIGHT * 20, cy - 2, top - 14)]
    out["svc"] = Tubes.polyline(np.array(svc), np.array([8.0, 8.5, 9.0]))
    pa = TreeBuilder()
    trunk = pa.chain([(LEFT * 10, cy + 24, top - 14), (LEFT * 12, cy + 8, kz - 4)], [12.0, 12.0], -1)
    pa.chain([(LEFT * 12, cy + 8, kz - 4), (LEFT * 36, ty + 2, kz - 16)], [9.0, 8.0], trunk)
    pa.chain(
        [(LEFT * 12, cy + 8, kz - 4), (RIGHT * 4, ty + 8, kz - 8), (RIGHT * 34, ty + 4, kz - 14)],
        [9.0, 8.5, 8.0],
        trunk,
    )
    out["pulmonary"] = pa.tubes()
    out["esophagus"] = Tubes.polyline(
        np.array([(RIGHT * 3, vy + 26, 140.0), (LEFT * 6, vy + 26, -140.0)]), np.array([7.0, 7.0])
    )
    return out


def hila(anat: Anatomy) -> dict[str, np.ndarray]:
    """Roots of the intrapulmonary trees (ends of the central tubes), per tree and side."""
    ty, kz, (_, cy, cz) = anat.trachea_y, anat.carina_z, anat.heart_c
    return {
        "airway_right": np.array([RIGHT * 26, ty - 3, kz - 16]),
        "airway_left": np.array([LEFT * 36, ty - 6, kz - 26]),
        "artery_right": np.array([RIGHT * 34, ty + 4, kz - 14]),
        "artery_left": np.array([LEFT * 36, ty + 2, kz - 16]),
        "vein_right": np.array([RIGHT * 28, cy - 14, cz + 12]),
        "vein_left": np.array([LEFT * 30, cy - 16, cz + 10]),
    }


def sample_lung_points(
    anat: Anatomy, rng: np.random.Generator, n: int, side: float, clear_tubes: Tubes
) -> tuple[np.ndarray, np.ndarray]:
    """`n` uniform points (n, 3) in one lung and their lobe labels, by rejection sampling."""
    found: list[np.ndarray] = []
    count = 0
    lo = np.array([0.0 if side == RIGHT else -anat.cav_a, anat.cav_post, -120.0])
    hi = np.array([anat.cav_a if side == RIGHT else 0.0, anat.cav_y + anat.cav_b, anat.apex_z])
    while count < n:
        p = rng.uniform(lo, hi, size=(4 * n, 3))
        keep = anat.lung(p[:, 0], p[:, 1], p[:, 2])
        p = p[keep]
        p = p[tube_clearance_points(p, clear_tubes) > 3.0]
        found.append(p)
        count += len(p)
    points = np.concatenate(found)[:n]
    labels = anat.lobes(points[:, 0], points[:, 1], points[:, 2], np.ones(len(points), bool))
    return points, labels


def grow_tree(
    builder: TreeBuilder,
    root: np.ndarray,
    points: np.ndarray,
    radius: float,
    parent: int,
    step: float = 0.6,
    leaf_points: int = 2,
) -> None:
    """Grow a branching tree from `root` into the territory `points` (see the module doc)."""
    stack = [(np.asarray(root, float), points, radius, parent)]
    while stack:
        p, pts, r, par = stack.pop()
        if len(pts) <= leaf_points:
            builder.add(p, pts.mean(0), r, 0.8 * r, par)
            continue
        centred = pts - pts.mean(0)
        axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
        half = centred @ axis > 0
        for sub in (pts[half], pts[~half]):
            r_child = r * (len(sub) / len(pts)) ** (1.0 / 3.0)
            end = p + step * (sub.mean(0) - p)
            idx = builder.add(p, end, r_child, r_child, par)
            stack.append((end, sub, r_child, idx))


def lobar_tree(
    builder: TreeBuilder, root: np.ndarray, points: np.ndarray, labels: np.ndarray, radius: float, parent: int
) -> None:
    """A tree whose first branches are one per lobe, so that its sub-trees stay in their lobes."""
    for lobe in np.unique(labels):
        sub = points[labels == lobe]
        r_lobe = radius * (len(sub) / len(points)) ** (1.0 / 3.0)
        end = root + 0.45 * (sub.mean(0) - root)
        idx = builder.add(root, end, r_lobe, r_lobe, parent)
        grow_tree(builder, end, sub, r_lobe, idx)


def build_trees(anat: Anatomy, rng: np.random.Generator, central: dict[str, Tubes]) -> dict[str, Tubes]:
    """The airway tree (from the top of the trachea) and the pulmonary arteries and veins."""
    clear = central["aorta"].concat(central["svc"]).concat(central["pulmonary"])
    clear = clear.concat(central["esophagus"]).concat(central["central_airway"])
    roots = hila(anat)
    airway = TreeBuilder(list(zip(*_rows(central["central_airway"]), strict=True)))
    ends = central["central_airway"].b
    arteries, veins = TreeBuilder(), TreeBuilder()
    for side, name in ((RIGHT, "right"), (LEFT, "left")):
        pts, labels = sample_lung_points(anat, rng, 260, side, clear)
        root = roots[f"airway_{name}"]
        bronchus = int(np.argmin(np.linalg.norm(ends - root, axis=1)))  # main bronchus' last segment
        lobar_tree(airway, root, pts, labels, 5.0, bronchus)
        pts, labels = sample_lung_points(anat, rng, 520, side, clear)
        lobar_tree(arteries, roots[f"artery_{name}"], pts, labels, 7.0, -1)
        pts, _ = sample_lung_points(anat, rng, 520, side, clear)
        grow_tree(veins, roots[f"vein_{name}"], pts, 7.0, -1)
    return {"airway": airway.tubes(), "arteries": arteries.tubes(), "veins": veins.tubes()}


def rib_tubes(anat: Anatomy) -> tuple[Tubes, Tubes]:
    """Twelve pairs of ribs (bone) and their anterior costal cartilages, following the cavity wall.

    Each rib leaves the spine at a transverse process, runs round the cavity 7 mm outside it and
    descends anteriorly; the upper ribs are smaller where the thorax narrows to the apex.
    """
    bone, cartilage = TreeBuilder(), TreeBuilder()
    p = 2.3
    for k in range(12):
        z0 = anat.apex_z - 4.0 - 20.0 * k
        shrink = float(np.clip(np.sqrt(max(0.0, 1.0 - ((z0 - 20.0) / (anat.apex_z - 10.0)) ** 2)), 0.55, 1.0))
        end_deg = 80.0 if k < 7 else 80.0 - 22.0 * (k - 6)
        phi = np.radians(np.linspace(-74.0, end_deg, 16))
        t = np.linspace(0.0, 1.0, 16)
        ca, sa = np.cos(phi), np.sin(phi)
        rx = (anat.cav_a + 7.0) * shrink * np.abs(ca) ** (2.0 / p)
        ry = (anat.cav_b + 7.0) * shrink * np.sign(sa) * np.abs(sa) ** (2.0 / p)
        zs = z0 + 8.0 * np.sin(np.pi * t) - 48.0 * t
        cut = 12 if k < 7 else 16
        for side in (LEFT, RIGHT):
            pts = np.stack([side * rx, anat.cav_y + ry, zs], axis=1)
            radii = np.full(16, 4.5)
            bone.chain(pts[:cut], radii[:cut], -1)
            if cut < 16:
                cartilage.chain(pts[cut - 1 :], radii[cut - 1 :], -1)
    return bone.tubes(), cartilage.tubes()


def _rows(t: Tubes):
    return (
        list(t.a),
        list(t.b),
        [float(r) for r in t.ra],
        [float(r) for r in t.rb],
        [int(p) for p in t.parent],
    )
