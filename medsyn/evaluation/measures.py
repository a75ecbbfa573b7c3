"""Per-volume clinical measures of a chest CT, computed from the CT itself (no ground-truth masks).

The CT is always re-segmented (lobes, airway, vessels) with a backend of `medsyn.data.segment`; what the
backends do not give (pleural fluid, heart, inner thoracic outline, nodules) comes from
`medsyn.evaluation.thorax`. Definitions (MedSyn tables in brackets):

- effusion_ml, effusion_left_ml, effusion_right_ml [II]: pleural fluid volume (mL); left / right are the
  patient's, by the world x of each voxel (RAS+: x < 0 is the patient's left).
- ctr [IV]: cardiothoracic ratio, the widest transverse (x) extent of the heart over the axial slices
  where lungs or pleural fluid flank it on both sides, divided by the transverse extent of the inner
  thoracic outline (lungs plus pleural fluid) on that same slice; among slices of equal heart width, the
  one with the widest thorax (`thorax.cardiothoracic_widths`).
- laa950_pct [III]: %LAA-950, 100 x the fraction of lung parenchyma voxels (lungs without the airway
  lumen) below -950 HU. The lumen is the re-segmented airway less its leaks into emphysema and bullae
  (`medsyn.evaluation.airway`); the leaks count as lung. airway_leak_mm3 is the volume of those leaks.
- lung_ml, lobe_ml, airway_mm3, vessel_mm3 [I]: volumes of the re-segmented lungs, lobes, airway lumen and
  pulmonary vessels.
- nodules, nodule_count, nodule_ml: compact solid lesions in the lungs (see `thorax.nodules`; lesions
  smaller than max(12 mm, 3 voxels) in equivalent-sphere diameter are not reported), with their lobe
  (the re-segmented lobe under most of the lesion, or the nearest lobe), volume, equivalent-sphere
  diameter and centre (world mm).
- with generated masks: lobe_lung_dice, airway_dice, vessel_dice (generated against re-segmented, MONAI
  Dice) and mask_lung_ml, mask_lobe_ml, mask_airway_mm3, mask_vessel_mm3 from the masks themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from medsyn.data.channels import LOBE_NAMES
from medsyn.data.segment import Segmenter, dice, get_backend, segment
from medsyn.evaluation import thorax
from medsyn.evaluation.airway import airway_lumen

MEASURES: tuple[str, ...] = (
    "effusion_ml",
    "effusion_left_ml",
    "effusion_right_ml",
    "ctr",
    "laa950_pct",
    "lung_ml",
    "airway_mm3",
    "airway_leak_mm3",
    "vessel_mm3",
    "nodule_count",
    "nodule_ml",
    "lobe_lung_dice",
    "airway_dice",
    "vessel_dice",
    "mask_lung_ml",
    "mask_airway_mm3",
    "mask_vessel_mm3",
)
# bumped when a definition changes what a volume measures, so that cached measures are not reused (2: the
# CTR's slice is the widest flanked one, `thorax.cardiothoracic_widths`)
MEASURES_VERSION = 2
UNITS: dict[str, tuple[str, str]] = {
    "effusion_ml": ("pleural effusion volume", "mL"),
    "effusion_left_ml": ("pleural effusion volume, patient's left", "mL"),
    "effusion_right_ml": ("pleural effusion volume, patient's right", "mL"),
    "ctr": (
        "cardiothoracic ratio (max cardiac / inner thoracic width, same axial level, lungs flanking the heart)",
        "ratio",
    ),
    "laa950_pct": ("%LAA-950: lung parenchyma below -950 HU", "%"),
    "lung_ml": ("lung volume (re-segmented)", "mL"),
    "lobe_ml": ("lobe volumes (re-segmented)", "mL"),
    "airway_mm3": ("airway lumen volume (re-segmented)", "mm3"),
    "airway_leak_mm3": ("re-segmented airway grown into low-attenuation lung (lung for %LAA-950)", "mm3"),
    "vessel_mm3": ("pulmonary vessel volume (re-segmented)", "mm3"),
    "nodules": ("solid nodules and masses in the lungs", "list"),
    "nodule_count": ("number of solid nodules and masses", "count"),
    "nodule_ml": ("total nodule and mass volume", "mL"),
    "lobe_lung_dice": ("Dice of generated lobes (>0) vs lungs re-segmented from the CT", "Dice"),
    "airway_dice": ("Dice of generated vs re-segmented airway", "Dice"),
    "vessel_dice": ("Dice of generated vs re-segmented vessels", "Dice"),
    "mask_lung_ml": ("lung volume of the generated lobe mask", "mL"),
    "mask_lobe_ml": ("lobe volumes of the generated lobe mask", "mL"),
    "mask_airway_mm3": ("airway volume of the generated airway mask", "mm3"),
    "mask_vessel_mm3": ("vessel volume of the generated vessel mask", "mm3"),
}


def _lobe_ml(lobes: np.ndarray, voxel_ml: float) -> dict[str, float]:
    counts = np.bincount(np.asarray(lobes, np.uint8).ravel(), minlength=len(LOBE_NAMES) + 1)
    return {name: round(float(counts[i]) * voxel_ml, 2) for i, name in LOBE_NAMES.items()}


def _nodule_record(mask: np.ndarray, lobes: np.ndarray, affine: np.ndarray, voxel_ml: float) -> dict:
    """Lobe, volume, equivalent-sphere diameter and world centre of one lesion mask."""
    under = np.bincount(lobes[mask].ravel(), minlength=len(LOBE_NAMES) + 1)[1:]
    if under.any():
        lobe = 1 + int(np.argmax(under))
    else:  # a lesion the lobe mask left out: the lobe of the nearest lobe voxel
        box = tuple(
            slice(max(s.start - 8, 0), s.stop + 8) for s in ndimage.find_objects(mask.astype(np.uint8))[0]
        )
        local = lobes[box]
        _, nearest = ndimage.distance_transform_edt(local == 0, return_indices=True)
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(mask[box]))
        lobe = int(local[tuple(n[centre] for n in nearest)])
    volume_ml = float(mask.sum()) * voxel_ml
    centre = np.asarray(affine, float) @ np.array([*ndimage.center_of_mass(mask), 1.0])
    return {
        "lobe": lobe,
        "lobe_name": LOBE_NAMES.get(lobe, "none"),
        "volume_ml": round(volume_ml, 3),
        "diameter_mm": round(float((6000.0 * volume_ml / np.pi) ** (1.0 / 3.0)), 2),
        "center_mm": [round(float(c), 1) for c in centre[:3]],
    }


def measure_volume(
    hu: np.ndarray,
    affine: np.ndarray,
    masks: Mapping[str, np.ndarray] | None = None,
    backend: Segmenter | None = None,
) -> dict:
    """Clinical measures of one RAS chest CT in HU (X, Y, Z) with its 4x4 affine; see the module docstring.

    `masks` (any of lobes, airway, vessels) are the volume's own generated masks, compared with the
    re-segmentation; `backend` re-segments the CT (None: the threshold backend). Returns a flat,
    JSON-serialisable dict.
    """
    hu = np.asarray(hu, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(
            f"measure_volume: expected a 3-D volume and a 4x4 affine, got {hu.shape}, {affine.shape}"
        )
    spacing = thorax.spacing_of(affine)
    voxel_mm3 = float(np.prod(spacing))
    voxel_ml = voxel_mm3 / 1000.0
    seg = segment(hu, affine, backend if backend is not None else get_backend("threshold"))
    lobes = seg["lobes"].astype(np.uint8)
    lungs, airway, vessels = lobes > 0, seg["airway"] > 0, seg["vessels"] > 0

    fluid = thorax.pleural_fluid(hu, spacing, airway) & ~lungs
    left = thorax.world_x(affine, hu.shape) < 0
    contents = thorax.pleural_contents(lungs, fluid)
    heart = thorax.heart(hu, spacing, thorax.slice_hull(contents), fluid)
    heart_width, thorax_width = thorax.cardiothoracic_widths(heart, contents)
    lumen = airway_lumen(hu, airway, spacing)
    parenchyma = (lungs | airway) & ~lumen  # leaks of the grown airway are lung the lung mask left out
    found = [_nodule_record(m, lobes, affine, voxel_ml) for m in thorax.nodules(hu, spacing, lungs)]

    out: dict = {
        "effusion_ml": round(float(fluid.sum()) * voxel_ml, 2),
        "effusion_left_ml": round(float((fluid & left).sum()) * voxel_ml, 2),
        "effusion_right_ml": round(float((fluid & ~left).sum()) * voxel_ml, 2),
        "ctr": round(heart_width / thorax_width, 4) if thorax_width else 0.0,
        "laa950_pct": round(100.0 * float((hu[parenchyma] < -950).mean()), 3) if parenchyma.any() else 0.0,
        "lung_ml": round(float(lungs.sum()) * voxel_ml, 2),
        "lobe_ml": _lobe_ml(lobes, voxel_ml),
        "airway_mm3": round(float(airway.sum()) * voxel_mm3, 1),
        "airway_leak_mm3": round(float((airway & ~lumen).sum()) * voxel_mm3, 1),
        "vessel_mm3": round(float(vessels.sum()) * voxel_mm3, 1),
        "nodules": found,
        "nodule_count": len(found),
        "nodule_ml": round(sum(n["volume_ml"] for n in found), 3),
    }
    masks = masks or {}
    if "lobes" in masks:
        given = np.asarray(masks["lobes"]).astype(np.uint8)
        out["lobe_lung_dice"] = round(dice(given > 0, lungs), 4)
        out["mask_lung_ml"] = round(float((given > 0).sum()) * voxel_ml, 2)
        out["mask_lobe_ml"] = _lobe_ml(given, voxel_ml)
    for name, key in (("airway", "airway"), ("vessels", "vessel")):
        if name in masks:
            given = np.asarray(masks[name]) > 0
            out[f"{key}_dice"] = round(dice(given, seg[name] > 0), 4)
            out[f"mask_{key}_mm3"] = round(float(given.sum()) * voxel_mm3, 1)
    return out
