"""Draw the phantom's normal anatomy on a voxel grid: HU image, lung, lobe, airway and vessel masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsyn.data.phantom.anatomy import Anatomy
from medsyn.data.phantom.geometry import Grid, Tubes, rasterize_tubes

# Hounsfield units of the tissues (non-contrast CT)
HU = {
    "air": -1000.0, "fat": -100.0, "mediastinal_fat": -85.0, "muscle": 45.0, "soft": 35.0,
    "blood": 42.0, "liver": 58.0, "csf": 10.0, "cortex": 750.0, "marrow": 230.0,
    "cartilage": 120.0, "sternum": 380.0, "disc": 80.0, "lung": -860.0, "airway_wall": 20.0,
}  # fmt: skip


@dataclass
class Drawn:
    """Float HU image and the anatomical masks on one grid (before pathology and noise)."""

    hu: np.ndarray  # (S, S, S) float32
    lung: np.ndarray  # bool, the pleural space
    lobes: np.ndarray  # uint8 lobe labels of the lung voxels
    airway: np.ndarray  # bool, lumen of trachea and bronchi
    vessels: np.ndarray  # bool, pulmonary vessels inside the lungs
    heart: np.ndarray  # bool
    cavity: np.ndarray  # bool (S, S, 1), inner outline of the bony thorax
    posterior: np.ndarray  # (1, S, 1) 0 anteriorly .. 1 posteriorly, for dependent density


def _slab(mask2d: np.ndarray, size: int) -> np.ndarray:
    return np.broadcast_to(mask2d, (*mask2d.shape[:2], size))


def draw_anatomy(anat: Anatomy, grid: Grid, tubes: dict[str, Tubes]) -> Drawn:
    """Paint body wall, bones, mediastinum, heart, great vessels, lungs, fissures and trees."""
    x, y, z = grid.xyz
    h = grid.spacing
    # axial outline (z-invariant), then broadcast along z
    body, inner = anat.body(x, y), anat.body(x, y, inset=anat.fat)
    cavity = anat.cavity(x, y)
    vb, arch = anat.spine(x, y)
    vb_core = (x**2 + (y - anat.vertebra_y) ** 2) <= 13.0**2
    plane = np.where(body, HU["fat"], HU["air"])
    plane = np.where(inner, HU["muscle"], plane)
    plane = np.where(cavity, HU["mediastinal_fat"], plane)
    plane = np.where(arch, HU["cortex"] * 0.8, plane)
    plane = np.where(vb, HU["cortex"], plane)
    plane = np.where(vb_core, HU["marrow"], plane)
    plane = np.where(anat.spinal_canal(x, y), HU["csf"], plane)
    hu = np.ascontiguousarray(np.broadcast_to(plane.astype(np.float32), grid.shape))
    # intervertebral discs every 24 mm
    disc = (np.mod(z + 7.0, 24.0) < 5.0) & vb
    hu[np.broadcast_to(disc, grid.shape)] = HU["disc"]
    # abdomen under the diaphragm: liver on the right, spleen/stomach on the left
    below = cavity & (z < anat.diaphragm(x, y))
    hu[below] = np.broadcast_to(np.where(x > 0, HU["liver"], HU["soft"]), grid.shape)[below]
    # sternum and ribs
    front = anat.cav_y + anat.cav_b
    sternum = (np.abs(x) < 13.0) & (y > front + 1.0) & (y < front + 12.0) & (z > -75.0) & (z < 78.0)
    hu[sternum] = HU["sternum"]
    bone, cartilage = tubes["ribs"], tubes["cartilage"]
    hu[rasterize_tubes(grid, cartilage.resolvable(h, 0.0))] = HU["cartilage"]
    bone = bone.resolvable(h, 0.0)
    hu[rasterize_tubes(grid, bone)] = HU["cortex"]
    hu[rasterize_tubes(grid, bone, grow=-max(1.5, h))] = HU["marrow"]
    # heart and great vessels
    heart = anat.heart(x, y, z)
    hu[heart] = HU["blood"]
    central = tubes["aorta"].concat(tubes["svc"]).concat(tubes["pulmonary"]).resolvable(h, 0.0)
    esophagus = tubes["esophagus"].resolvable(h, 0.0)
    hu[rasterize_tubes(grid, central)] = HU["blood"]
    hu[rasterize_tubes(grid, esophagus)] = HU["soft"]
    excluded = rasterize_tubes(grid, central.concat(esophagus).concat(tubes["central_airway"]), grow=3.0)
    # lungs with a slight dependent (posterior) density gradient
    lung = anat.lung(x, y, z, excluded)
    posterior = np.clip((anat.cav_y - y) / anat.cav_b, -1.0, 1.0) * 0.5 + 0.5
    hu[lung] = np.broadcast_to(HU["lung"] + 40.0 * posterior**2, grid.shape)[lung]
    idx = np.nonzero(lung)  # the lungs are ~10% of the grid: evaluate fissures there only
    lx, ly, lz = (grid.axis[i] for i in idx)
    near = anat.fissure_distance(lx, ly, lz) < max(0.6, 0.5 * h)
    hu[tuple(i[near] for i in idx)] += 200.0 * min(1.0, 1.2 / h)
    lobes = np.zeros(grid.shape, np.uint8)
    lobes[idx] = anat.lobes(lx, ly, lz, True)
    # pulmonary vessels (drawn in the chest, masked in the lungs)
    pv = rasterize_tubes(grid, tubes["arteries"].concat(tubes["veins"]).resolvable(h)) & cavity & ~heart
    hu[pv] = HU["blood"]
    # airway: wall, then lumen
    airway_tubes = tubes["airway"].resolvable(h)
    wall = rasterize_tubes(grid, airway_tubes.scaled(1.3, 0.4))
    lumen = rasterize_tubes(grid, airway_tubes)
    hu[wall & body] = HU["airway_wall"]
    hu[lumen] = HU["air"]
    return Drawn(hu, lung, lobes, lumen, pv & lung, heart, cavity, posterior)


def finish_ct(hu: np.ndarray, grid: Grid, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """Scanner blur (0.6 mm point spread) and slightly correlated Gaussian noise; int16 HU."""
    sigma = 0.6 / grid.spacing
    if sigma >= 0.3:
        hu = ndimage.gaussian_filter(hu, sigma, truncate=2.5)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise[1:] += noise[:-1].copy()  # neighbour correlation along one axis
    noise *= noise_hu / float(noise.std() + 1e-6)
    hu = hu + noise
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)
