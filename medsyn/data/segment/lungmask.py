"""`lungmask` backend: lobes from the LTRCLobes model (fused with R231), nothing else.

LTRCLobes labels are 1 left upper, 2 left lower, 3 right upper, 4 right middle, 5 right lower: the
same as ours, so only the array layout differs. lungmask takes a numpy volume as SimpleITK would give
it for an axial DICOM series: (z, y, x) with x toward the patient's left and y posterior (LPS).
Airway and vessels come from the threshold backend inside these lobes (see `segment`).
"""

from __future__ import annotations

import numpy as np

from medsyn.errors import MedsynError

INSTALL_HINT = "pip install medsyn[seg]"
LTRC_LOBES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # LTRCLobes label -> our lobe label


def ras_to_lungmask(volume: np.ndarray) -> np.ndarray:
    """RAS (x, y, z) array -> lungmask's (z, y, x) LPS layout."""
    return np.ascontiguousarray(np.asarray(volume)[::-1, ::-1, :].transpose(2, 1, 0))


def lungmask_to_ras(volume: np.ndarray) -> np.ndarray:
    """Inverse of `ras_to_lungmask`."""
    return np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0)[::-1, ::-1, :])


def lobes_from_lungmask(labels_zyx: np.ndarray) -> np.ndarray:
    """An LTRCLobes output (z, y, x; labels 0..5) -> our RAS lobe map (uint8)."""
    labels = np.asarray(labels_zyx)
    unknown = set(np.unique(labels).tolist()) - {0, *LTRC_LOBES}
    if unknown:
        raise ValueError(f"unexpected LTRCLobes labels {sorted(unknown)}; expected 0..5")
    lut = np.zeros(6, np.uint8)
    for source, target in LTRC_LOBES.items():
        lut[source] = target
    return lungmask_to_ras(lut[labels.astype(np.int64)])


class LungmaskBackend:
    """Runs lungmask's `LMInferer(modelname="LTRCLobes", fillmodel="R231")` on the volume."""

    def __init__(self, modelname: str = "LTRCLobes", fillmodel: str | None = "R231", force_cpu: bool = True):
        try:
            from lungmask import LMInferer
        except ImportError as err:
            raise MedsynError(f"the lungmask backend needs lungmask: {INSTALL_HINT}") from err
        self.inferer = LMInferer(modelname=modelname, fillmodel=fillmodel, force_cpu=force_cpu)

    def __call__(self, hu: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
        labels = self.inferer.apply(ras_to_lungmask(np.asarray(hu, dtype=np.float32)))
        return {"lobes": lobes_from_lungmask(labels)}
