"""Digitally reconstructed radiographs: a CT volume projected to a frontal chest film.

The physics, in three steps (a parallel-beam model, no scatter, one effective energy):

1. Attenuation from HU. Hounsfield units are defined relative to water, so at the effective energy of a
   chest exposure (about 70 keV) the linear attenuation coefficient is `mu = MU_WATER * (1 + HU / 1000)`,
   clipped at 0 (air, -1000 HU, attenuates nothing). `MU_WATER` = 0.0195 / mm: water's mass attenuation
   at 70 keV (NIST XCOM: 0.206 cm^2/g at 60 keV, 0.184 at 80 keV) times 1 g/cm^3.
2. Beer-Lambert along the antero-posterior axis (RAS axis 1): the line integral `p = sum(mu * dy)` over
   each ray, the transmitted intensity `I = exp(-p)`. A detector pixel averages intensity, so resampling
   to the output grid averages `I` (antialiased) and the log is taken afterwards.
3. Display window. The film shows log attenuation: `p` itself, mapped linearly to [-1, 1] over a fixed
   range of water-equivalent thickness, `WINDOW_WET_MM` = 80..240 mm of water (p = 1.56..4.68): a lung
   field (about 2.3: chest wall plus aerated lung) is dark, the heart and mediastinum (about 3.6) light,
   the spine and fluid-filled bases near white, air outside the body black. The window is the same for
   every subject, so DRRs are comparable across subjects (no per-image min/max stretching).

Orientation: as a frontal film is read, the patient's right is on the image's left and the head at the
top; rows run superior -> inferior, columns patient right -> left.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, io_orientation

MU_WATER = 0.0195  # linear attenuation of water at ~70 keV, per mm
WINDOW_WET_MM = (80.0, 240.0)  # display window in mm of water-equivalent thickness: black .. white


def attenuation(hu: np.ndarray, mu_water: float = MU_WATER) -> np.ndarray:
    """Linear attenuation per mm from Hounsfield units, clipped at 0 (same shape as `hu`)."""
    return np.maximum(np.float32(mu_water) * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0), 0.0)


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`volume` (i, j, k) flipped / permuted so its axes run towards R, A, S; returns it and the voxel
    size (mm) along each RAS axis. An oblique grid is taken along its nearest axes."""
    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)  # row i: (RAS axis of voxel axis i, flip)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return apply_orientation(volume, ornt), spacing


def line_integrals(
    hu: np.ndarray, affine: np.ndarray, mu_water: float = MU_WATER
) -> tuple[np.ndarray, tuple]:
    """Beer-Lambert line integrals of a CT (HU, voxel order i, j, k, any affine) along the
    antero-posterior axis, in the film's orientation.

    Returns `p` (rows, cols) = (S-I, R-L) with rows from the head down and columns from the patient's right
    to left, and the pixel size (row_mm, col_mm).
    """
    ras, spacing = to_ras(np.asarray(hu), affine)  # (X, Y, Z) towards R, A, S
    p = attenuation(ras, mu_water).sum(axis=1, dtype=np.float32) * np.float32(spacing[1])  # (X, Z)
    film = np.ascontiguousarray(p[::-1, ::-1].T)  # (Z from the top, X from the patient's right)
    return film, (float(spacing[2]), float(spacing[0]))


def resize_square(p: np.ndarray, pixel_mm: tuple[float, float], size: int) -> tuple[np.ndarray, float]:
    """Line integrals (H, W) with pixels of `pixel_mm` (row, col) -> (size, size) square pixels.

    The longer physical side fills the image and the shorter is centred with air (p = 0) either side.
    Transmitted intensity `exp(-p)` is resampled (bilinear, antialiased), as a detector averages it.
    Returns the resampled integrals and the output pixel size in mm.
    """
    height_mm, width_mm = p.shape[0] * pixel_mm[0], p.shape[1] * pixel_mm[1]
    field = max(height_mm, width_mm)
    h = max(1, round(size * height_mm / field))
    w = max(1, round(size * width_mm / field))
    intensity = torch.exp(-torch.as_tensor(p, dtype=torch.float32))[None, None]  # (1, 1, H, W)
    if (h, w) != p.shape:
        intensity = F.interpolate(
            intensity, size=(h, w), mode="bilinear", antialias=True, align_corners=False
        )
    q = -torch.log(intensity.clamp_min(1e-30))[0, 0]
    top, left = (size - h) // 2, (size - w) // 2
    out = torch.zeros(size, size)
    out[top : top + h, left : left + w] = q
    return out.numpy(), field / size


def display_window(p: np.ndarray, mu_water: float = MU_WATER, window_mm=WINDOW_WET_MM) -> np.ndarray:
    """Line integrals -> [-1, 1] over the fixed water-equivalent window (black -1 .. white +1)."""
    low, high = (mu_water * w for w in window_mm)
    return np.clip((np.asarray(p, dtype=np.float32) - low) / (high - low) * 2.0 - 1.0, -1.0, 1.0)


def drr(hu: np.ndarray, affine: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """A frontal radiograph of a CT: `hu` (i, j, k) in HU with its voxel-to-RAS `affine` ->
    (image (size, size) float32 in [-1, 1], pixel size in mm)."""
    p, pixel_mm = line_integrals(hu, affine)
    p, spacing_mm = resize_square(p, pixel_mm, size)
    return display_window(p), spacing_mm
