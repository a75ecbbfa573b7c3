"""`totalsegmentator` backend: lobes and trachea from the `total` task, airway and vessels from `lung_vessels`.

Label ids follow TotalSegmentator's `class_map` in `totalsegmentator/map_to_binary.py`
(wasserth/TotalSegmentator, commit 0275d30, the v2 maps): task `total` (v2) has 10 lung_upper_lobe_left,
11 lung_lower_lobe_left, 12 lung_upper_lobe_right, 13 lung_middle_lobe_right, 14 lung_lower_lobe_right,
16 trachea; the same file's `total_v1` map (TotalSegmentator 1.x) has the lobes at 13..17 and trachea 43;
task `lung_vessels` has 1 lung_vessels, 2 lung_trachea_bronchia. The mapping functions are pure, so they
are tested on label maps in those formats without the package or its weights.
"""

from __future__ import annotations

import numpy as np

from medsyn.errors import MedsynError

INSTALL_HINT = "pip install medsyn[seg]"

# TotalSegmentator label id -> our lobe label (1 LU, 2 LL, 3 RU, 4 RM, 5 RL)
TOTAL_LOBES: dict[int, dict[int, int]] = {
    2: {10: 1, 11: 2, 12: 3, 13: 4, 14: 5},  # class_map["total"] (v2)
    1: {13: 1, 14: 2, 15: 3, 16: 4, 17: 5},  # class_map["total_v1"]
}
TOTAL_TRACHEA: dict[int, int] = {2: 16, 1: 43}
LUNG_VESSELS_VESSELS, LUNG_VESSELS_AIRWAY = 1, 2  # class_map["lung_vessels"]
LOBE_ROIS = [
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "trachea",
]


def _check_version(version: int) -> None:
    if version not in TOTAL_LOBES:
        raise ValueError(
            f"version={version!r}: expected one of {sorted(TOTAL_LOBES)} (TotalSegmentator major)"
        )


def lobes_from_total(labels: np.ndarray, version: int = 2) -> np.ndarray:
    """A `total` task multilabel map -> lobe labels 0..5 (uint8); every other class becomes 0."""
    _check_version(version)
    lut = np.zeros(max(256, int(np.max(labels, initial=0)) + 1), np.uint8)
    for source, target in TOTAL_LOBES[version].items():
        lut[source] = target
    return lut[np.asarray(labels, dtype=np.int64)]


def masks_from_total(total: np.ndarray, lung_vessels: np.ndarray, version: int = 2) -> dict[str, np.ndarray]:
    """`total` and `lung_vessels` multilabel maps -> `{lobes, airway, vessels}` (uint8).

    The airway is the trachea (from `total`) together with `lung_trachea_bronchia`.
    """
    _check_version(version)
    total, lung_vessels = np.asarray(total), np.asarray(lung_vessels)
    if total.shape != lung_vessels.shape:
        raise ValueError(f"label maps differ in shape: {total.shape} vs {lung_vessels.shape}")
    airway = (lung_vessels == LUNG_VESSELS_AIRWAY) | (total == TOTAL_TRACHEA[version])
    return {
        "lobes": lobes_from_total(total, version),
        "airway": airway.astype(np.uint8),
        "vessels": (lung_vessels == LUNG_VESSELS_VESSELS).astype(np.uint8),
    }


def _import_api():
    try:
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as err:
        raise MedsynError(f"the totalsegmentator backend needs TotalSegmentator: {INSTALL_HINT}") from err
    return totalsegmentator


class TotalSegmentatorBackend:
    """Runs TotalSegmentator twice per volume (v2 `python_api.totalsegmentator`: Nifti1Image in, multilabel
    Nifti1Image out with `ml=True`; `device="gpu"` falls back to the CPU there)."""

    def __init__(self, fast: bool = False, device: str = "gpu", version: int = 2) -> None:
        _check_version(version)
        self.fast, self.device, self.version = fast, device, version
        self._run = _import_api()  # fail at construction, before any worker starts

    def __call__(self, hu: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
        import nibabel as nib

        image = nib.Nifti1Image(np.rint(hu).astype(np.int16), np.asarray(affine, dtype=np.float64))
        common = {"ml": True, "quiet": True, "device": self.device}
        total = self._run(image, None, task="total", roi_subset=LOBE_ROIS, fast=self.fast, **common)
        vessels = self._run(image, None, task="lung_vessels", **common)
        return masks_from_total(np.asarray(total.dataobj), np.asarray(vessels.dataobj), self.version)
