"""The trained model as a segmenter (MedSyn Table V): lobes, airway and vessels sampled with the CT fixed."""

from __future__ import annotations

import numpy as np

from medsyn.data.channels import decode_volume
from medsyn.errors import DataError
from medsyn.generation.fixed import FixedChannels
from medsyn.generation.stages import SampleOptions, synthesize


def segment_with_model(
    base, ct_hu: np.ndarray, sr=None, prompt: str = "", seed: int = 0, **options
) -> dict[str, np.ndarray]:
    """Lobes, airway and vessels of a CT (HU, on the output grid: the SR run's grid with `sr`, else the
    base grid) by sampling them with the CT held fixed; lobes decoded with the lungs in mind.
    `options` go to `SampleOptions`."""
    grid = sr.grid if sr is not None else base.grid
    if tuple(ct_hu.shape) != tuple(grid.shape):
        raise DataError(f"segment_with_model: CT of shape {ct_hu.shape}, expected the grid {grid.shape}")
    fixed = FixedChannels({"ct": np.asarray(ct_hu, np.float32)}, grid, {"ct": {"path": "<array>"}})
    opts = SampleOptions(**{"guidance": 1.0, **options})
    x = synthesize(base, sr, [prompt], [seed], opts, fixed)[0].numpy()  # (4, *S)
    out = decode_volume(x, clean=True)
    return {k: out[k] for k in ("lobes", "airway", "vessels")}
