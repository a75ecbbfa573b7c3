"""The airway lumen to leave out of %LAA-950: a re-segmented airway with its leaks into low-attenuation lung
removed.

Region growing from the trachea (the `threshold` backend) runs on through holes in the bronchial wall
into emphysema and bullae, which are as dark as the lumen; counted as airway, that lung drops out of the
%LAA-950 parenchyma. A real lumen is enclosed by a soft-tissue wall, a leak by aerated lung:

1. leak seeds: grown voxels nearer to aerated lung outside the airway (< `aerated_hu`, beyond the
   lumen's partial-volume rim of `rim_mm`) than to soft tissue (> `wall_hu`);
2. the leak spreads from the seeds through grown voxels whose neighbourhood (about `window_mm` around)
   outside the airway is less than `min_wall_fraction` wall, so bullae and emphysema clusters go as a
   whole while walled bronchi stop it;
3. leak pieces under `min_leak_mm3` are given back (partial-volume voxels at bronchial tips), and the
   lumen is the largest 26-connected part of what is left (the tree from the trachea).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_FULL = np.ones((3, 3, 3), bool)


def airway_lumen(
    hu: np.ndarray,
    airway: np.ndarray,
    spacing: tuple[float, float, float],
    aerated_hu: float = -700.0,
    wall_hu: float = -500.0,
    window_mm: float = 2.0,
    min_wall_fraction: float = 0.45,
    min_leak_mm3: float = 500.0,
    margin_mm: float = 20.0,
    rim_mm: float = 1.5,
) -> np.ndarray:
    """The airway lumen (bool, like `hu` (X, Y, Z)) of a grown `airway` mask without its leaks into lung.

    `spacing` is the voxel size (mm) along each axis. Thresholds were chosen on phantoms (emphysema
    patches at -985 HU, bullae at -1000 HU, a 20 HU bronchial wall) at 2 mm and 4 mm.
    """
    airway = np.asarray(airway, bool)
    lumen = np.zeros(airway.shape, bool)
    if not airway.any():
        return lumen
    spacing = np.asarray(spacing, float)
    # work in the airway's bounding box with a margin: nearer structures are all the test needs
    pad = np.ceil(margin_mm / spacing).astype(int)
    box = tuple(
        slice(max(s.start - p, 0), s.stop + p)
        for s, p in zip(ndimage.find_objects(airway.astype(np.uint8))[0], pad, strict=True)
    )
    grown, local = airway[box], np.asarray(hu, np.float32)[box]
    # lung is what lies beyond the lumen's partial-volume rim (at 1 mm the voxels hugging the grown region
    # are lumen blurred with wall, not lung; at 2-4 mm no neighbour is that close)
    rim = ndimage.distance_transform_edt(~grown, sampling=spacing) <= rim_mm
    aerated = ~grown & ~rim & (local < aerated_hu)
    wall = ~grown & (local > wall_hu)
    to_aerated = ndimage.distance_transform_edt(~aerated, sampling=spacing)
    to_wall = ndimage.distance_transform_edt(~wall, sampling=spacing)
    seeds = grown & (to_aerated < to_wall)

    size = [2 * max(1, round(window_mm / s)) + 1 for s in spacing]
    near_wall = ndimage.uniform_filter(wall.astype(np.float32), size)
    near_aerated = ndimage.uniform_filter(aerated.astype(np.float32), size)
    enclosed = near_wall >= min_wall_fraction * (near_wall + near_aerated)
    enclosed &= near_wall + near_aerated > 1e-6  # inside a wide lumen: undecided, the leak may pass
    leak = ndimage.binary_propagation(seeds, mask=grown & ~(enclosed & ~seeds))

    labels, _ = ndimage.label(leak, _FULL)
    volume = np.bincount(labels.ravel()) * float(np.prod(spacing))
    volume[0] = 0.0
    leak = volume[labels] >= min_leak_mm3
    labels, count = ndimage.label(grown & ~leak, _FULL)
    if count:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        lumen[box] = labels == np.argmax(sizes)
    return lumen
