"""Pathology of a phantom: what it has (sampled or set), how it is drawn, and what it measures.

Findings follow the MedSyn evaluation (pleural effusion volume, cardiothoracic ratio, %LAA-950)
plus nodules/masses, consolidation and ground-glass opacity, each placed in a lobe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from medsyn.data.channels import LOBE_NAMES
from medsyn.data.phantom.anatomy import Anatomy
from medsyn.data.phantom.geometry import Grid
from medsyn.data.phantom.render import HU, Drawn

SEVERITIES = ("none", "small", "moderate", "large")
SIDES = ("left", "right", "bilateral")
# fraction of a hemithorax's pleural space taken by fluid, per severity
EFFUSION_FRACTION = {"none": 0.0, "small": 0.05, "moderate": 0.14, "large": 0.31}
EFFUSION_RANGE = {"small": (0.03, 0.07), "moderate": (0.10, 0.18), "large": (0.24, 0.38)}
NORMAL_CTR, CARDIOMEGALY_CTR = (0.40, 0.49), (0.56, 0.70)
MASS_MM = 30.0  # a lesion of 30 mm or more is a mass


@dataclass
class Lesion:
    """A solid nodule (< 30 mm) or mass in a lobe."""

    lobe: int
    size_mm: float

    @property
    def kind(self) -> str:
        return "mass" if self.size_mm >= MASS_MM else "nodule"


@dataclass
class PathologyParams:
    """Everything abnormal about one phantom (the report describes exactly this)."""

    effusion: str = "none"  # none | small | moderate | large
    effusion_side: str = "right"  # left | right | bilateral (ignored when none)
    effusion_fraction: float | None = None  # share of the pleural space; None: severity default
    ctr: float = 0.45  # cardiothoracic ratio; >= 0.55 is reported as cardiomegaly
    emphysema_lobe: int = 0  # 0 = none, else the lobe with centrilobular emphysema
    emphysema_fraction: float = 0.0  # fraction of that lobe below -950 HU
    bullae: int = 0  # number of bullae (in the emphysematous lobe, or an upper lobe)
    lesions: list[Lesion] = field(default_factory=list)
    consolidation: list[int] = field(default_factory=list)  # lobes
    ground_glass: list[int] = field(default_factory=list)  # lobes

    def __post_init__(self) -> None:
        # lesions may come as dicts (a truth.json's params); the checks below read them as Lesions
        self.lesions = [x if isinstance(x, Lesion) else Lesion(**x) for x in self.lesions]
        if self.effusion not in SEVERITIES:
            raise ValueError(f"effusion={self.effusion!r}; expected one of {SEVERITIES}")
        if self.effusion_side not in SIDES:
            raise ValueError(f"effusion_side={self.effusion_side!r}; expected one of {SIDES}")
        if self.effusion_fraction is not None and not 0.0 < self.effusion_fraction < 0.6:
            raise ValueError(f"effusion_fraction={self.effusion_fraction}; expected a share in (0, 0.6)")
        if not 0.3 <= self.ctr <= 0.8:
            raise ValueError(f"ctr={self.ctr}; expected a cardiothoracic ratio in [0.3, 0.8]")
        for lobe in [
            self.emphysema_lobe,
            *self.consolidation,
            *self.ground_glass,
            *(x.lobe for x in self.lesions),
        ]:
            if lobe not in range(0, 6):
                raise ValueError(f"lobe {lobe}; expected 1..5 ({LOBE_NAMES})")

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr >= 0.55

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FindingRegions:
    """Where each finding of a phantom was drawn: voxel masks on its grid, each (S, S, S).

    A mask holds the voxels the finding's drawing set, less those the pleural fluid (drawn last) took
    over; a finding drawn over another (a mass in a consolidated lobe) leaves both masks set there.
    Findings the phantom does not have are all False.
    """

    effusion: np.ndarray  # bool, pleural fluid
    lesions: np.ndarray  # int16: 0 none, i + 1 where lesion i of truth["lesions"] (a later one on top)
    bullae: np.ndarray  # bool
    consolidation: np.ndarray  # bool, the dense part of the consolidated lobes
    emphysema: np.ndarray  # bool, the low-attenuation patches of the emphysematous lobe
    ground_glass: np.ndarray  # bool

    @staticmethod
    def empty(shape: tuple[int, ...]) -> FindingRegions:
        """No findings on a grid of `shape`."""

        def none() -> np.ndarray:
            return np.zeros(shape, bool)

        return FindingRegions(none(), np.zeros(shape, np.int16), none(), none(), none(), none())


def sample_pathology(rng: np.random.Generator) -> PathologyParams:
    """Draw findings with roughly the mix of a chest CT cohort (about a third normal)."""
    u = rng.uniform
    params = PathologyParams()
    if u() < 0.35:
        params.effusion = str(rng.choice(SEVERITIES[1:]))
        params.effusion_side = str(rng.choice(SIDES, p=[0.35, 0.4, 0.25]))
    params.ctr = float(u(*CARDIOMEGALY_CTR) if u() < 0.25 else u(*NORMAL_CTR))
    if u() < 0.25:
        params.emphysema_lobe = int(rng.choice([1, 3, 1, 3, 2, 5]))  # upper-lobe predominant
        params.emphysema_fraction = float(u(0.08, 0.3))
        params.bullae = int(rng.integers(0, 3))
    if u() < 0.3:
        params.lesions = [
            Lesion(int(rng.integers(1, 6)), float(round(u(6.0, 45.0) if u() < 0.3 else u(5.0, 25.0), 0)))
            for _ in range(int(rng.integers(1, 3)))
        ]
    if u() < 0.2:
        params.consolidation = [int(rng.integers(1, 6))]
    if u() < 0.15:
        params.ground_glass = sorted({int(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 3)))})
    if params.effusion != "none":  # drawn last, so the draws above do not depend on it
        params.effusion_fraction = float(u(*EFFUSION_RANGE[params.effusion]))
    return params


def _side_mask(x: np.ndarray, side: str) -> np.ndarray:
    """Voxels on the patient's left (x < 0 in RAS+), right, or both."""
    if side == "bilateral":
        return np.ones_like(x, dtype=bool)
    return (x < 0) if side == "left" else (x >= 0)


def _ball(grid: Grid, centre: np.ndarray, radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """A ball's bounding box on the grid and the mask inside it (cheap for small balls)."""
    lo = np.maximum(np.floor(grid.index(centre - radius)).astype(int), 0)
    hi = np.minimum(np.ceil(grid.index(centre + radius)).astype(int) + 1, grid.size)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    a = grid.axis
    x, y, z = a[box[0], None, None], a[None, box[1], None], a[None, None, box[2]]
    inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
    return box, inside


_DIRECTIONS = np.array(
    [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)], float
)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)


def _pick_inside(rng: np.random.Generator, anat: Anatomy, lobe: int, margin_mm: float) -> np.ndarray:
    """A point (mm) of `lobe` whose ball of radius `margin_mm` stays in the lobe, found on the
    analytic anatomy (so it is the same at every grid size) among a fixed number of candidates."""
    lo = np.array([-anat.cav_a, anat.cav_post, -110.0])
    hi = np.array([anat.cav_a, anat.cav_y + anat.cav_b, anat.apex_z])
    cand = rng.uniform(lo, hi, size=(4096, 3))
    inside = anat.lobes(cand[:, 0], cand[:, 1], cand[:, 2], anat.lung(cand[:, 0], cand[:, 1], cand[:, 2]))
    cand = cand[inside == lobe]
    if not len(cand):
        return np.array([np.nan] * 3)
    best, best_score = cand[0], -1
    for r in (margin_mm, 0.7 * margin_mm, 0.4 * margin_mm):
        for c in cand[:256]:
            ring = c + r * _DIRECTIONS
            ok = anat.lobes(ring[:, 0], ring[:, 1], ring[:, 2], anat.lung(ring[:, 0], ring[:, 1], ring[:, 2]))
            score = int((ok == lobe).sum())
            if score == len(ring):
                return c
            if score > best_score:
                best, best_score = c, score
    return best


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(sigma_vox, 0.5))
    return (field - field.mean()) / (field.std() + 1e-6)


def apply_pathology(
    drawn: Drawn,
    lobes: np.ndarray,
    anat: Anatomy,
    grid: Grid,
    params: PathologyParams,
    rng: np.random.Generator,
) -> dict:
    """Draw the findings into `drawn.hu` and the masks (in place); return placement details: `lesions`
    (one dict per placed lesion), `fluid` (the effusion mask) and `regions` (`FindingRegions`).

    The number of random draws is fixed per finding, so changing one finding's parameters does
    not move the others.
    """
    hu, x = drawn.hu, grid.xyz[0]
    spacing = grid.spacing
    placed: dict = {"lesions": []}
    regions = FindingRegions.empty(grid.shape)
    lung = lobes > 0
    # emphysema: low-attenuation patches in a lobe, and bullae
    place_rng, field_rng = rng.spawn(2)  # placement is the same at every size
    fields = (
        _smooth_field(field_rng, grid.shape, 1.5 / spacing)
        if params.emphysema_lobe or params.ground_glass
        else np.zeros(grid.shape, np.float32)
    )
    if params.emphysema_lobe:
        region = lobes == params.emphysema_lobe
        values = fields[region]
        cut = np.quantile(values, 1.0 - params.emphysema_fraction) if values.size else np.inf
        patch = region & (fields >= cut)
        hu[patch] = -985.0
        regions.emphysema |= patch
    bullae_lobe = params.emphysema_lobe or 3
    for _ in range(params.bullae):
        radius = float(place_rng.uniform(8.0, 16.0))
        centre = _pick_inside(place_rng, anat, bullae_lobe, radius + 2.0)
        if np.isnan(centre).any():
            continue
        box, ball = _ball(grid, centre, radius)
        ball &= lung[box]
        hu[box][ball] = -1000.0
        drawn.vessels[box][ball] = False
        regions.bullae[box] |= ball
    # ground glass: a hazy rise of a lobe's density, vessels still visible
    for lobe in params.ground_glass:
        region = (lobes == lobe) & ~drawn.vessels & ~drawn.airway & (fields < 0.3)  # apart from emphysema
        hu[region] = hu[region] + 260.0
        regions.ground_glass |= region
    # consolidation: the dependent part of a lobe becomes soft tissue, air bronchograms stay
    for lobe in params.consolidation:
        region = lobes == lobe
        if region.any():
            ys = np.broadcast_to(grid.xyz[1], grid.shape)[region]
            cut = np.quantile(ys, 0.55)
            dense = region & (grid.xyz[1] <= cut) & ~drawn.airway
            hu[dense] = 35.0
            regions.consolidation |= dense
    # nodules and masses: solid balls inside their lobe
    for lesion in params.lesions:
        radius = lesion.size_mm / 2.0
        centre = _pick_inside(place_rng, anat, lesion.lobe, radius + 2.0)
        if np.isnan(centre).any():
            continue
        box, ball = _ball(grid, centre, radius)
        ball &= lung[box]
        hu[box][ball] = 40.0
        regions.lesions[box][ball] = len(placed["lesions"]) + 1
        placed["lesions"].append({"kind": lesion.kind, "lobe": lesion.lobe, "lobe_name": LOBE_NAMES[lesion.lobe],
                                  "size_mm": lesion.size_mm, "center_mm": [round(float(c), 1) for c in centre],
                                  "volume_ml": round(float(ball.sum() * grid.voxel_ml), 2)})  # fmt: skip
    # pleural effusion: fluid fills the most dependent (posterior, basal) part of each pleural space
    fluid = np.zeros(grid.shape, dtype=bool)
    if params.effusion != "none":
        zdia = anat.diaphragm(*grid.xyz[:2])
        score = (grid.xyz[2] - zdia) + 0.8 * (grid.xyz[1] - anat.cav_post)  # low = dependent
        for side in ("left", "right") if params.effusion_side == "bilateral" else (params.effusion_side,):
            space = drawn.lung & _side_mask(x, side)
            values = np.broadcast_to(score, grid.shape)[space]
            if not values.size:
                continue
            cut = np.quantile(values, params.effusion_fraction or EFFUSION_FRACTION[params.effusion])
            fluid |= space & (score <= cut)
            band = space & (score > cut) & (score <= cut + 6.0)  # compressive atelectasis above it
            hu[band] = np.maximum(hu[band], -250.0)
        hu[fluid] = 12.0
        lobes[fluid] = 0
        drawn.vessels[fluid] = False
        drawn.airway[fluid & lung] = False
        # bronchi beyond the fluid are cut off from the tree: let them collapse into lung
        labels, count = ndimage.label(drawn.airway, np.ones((3, 3, 3), bool))
        if count > 1:
            tree = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
            orphan = drawn.airway & (labels != tree)
            hu[orphan] = HU["lung"]
            drawn.airway[orphan] = False
    regions.effusion = fluid
    for name in ("bullae", "consolidation", "emphysema", "ground_glass"):
        getattr(regions, name)[fluid] = False
    regions.lesions[fluid] = 0
    placed["fluid"], placed["regions"] = fluid, regions
    return placed


def measure(ct: np.ndarray, lobes: np.ndarray, airway: np.ndarray, heart: np.ndarray, cavity: np.ndarray,
            fluid: np.ndarray, grid: Grid) -> dict:  # fmt: skip
    """The clinical measures of the finished volume (effusion, %LAA-950, CTR, lesions): the ground truth.

    %LAA-950 is over the lung parenchyma (lobes without the airway lumen), as usual.
    """
    lung = lobes > 0
    parenchyma = lung & ~airway
    x = grid.xyz[0]
    left, right = fluid & (x < 0), fluid & (x >= 0)
    # CTR: widest transverse heart diameter over the widest inner thoracic diameter
    heart_width = _max_width(heart)
    thorax_width = _max_width(np.broadcast_to(cavity, grid.shape))
    lung_voxels = int(lung.sum())
    return {
        "effusion_ml": round(float(fluid.sum() * grid.voxel_ml), 1),
        "effusion_ml_left": round(float(left.sum() * grid.voxel_ml), 1),
        "effusion_ml_right": round(float(right.sum() * grid.voxel_ml), 1),
        "ctr": round(heart_width / thorax_width, 3) if thorax_width else 0.0,
        "laa950_percent": round(
            100.0 * float((ct[parenchyma] < -950).mean()) if parenchyma.any() else 0.0, 2
        ),
        "lung_volume_ml": round(lung_voxels * grid.voxel_ml, 1),
        "lobe_volume_ml": {
            LOBE_NAMES[i]: round(float((lobes == i).sum() * grid.voxel_ml), 1) for i in range(1, 6)
        },
    }


def _max_width(mask: np.ndarray) -> float:
    """Largest extent along x (voxels) of `mask` in any axial slice."""
    if not mask.any():
        return 0.0
    cols = mask.any(axis=1)  # (x, z): which x positions are occupied in each axial slice
    best = 0
    for k in np.flatnonzero(cols.any(axis=0)):
        occupied = np.flatnonzero(cols[:, k])
        best = max(best, occupied[-1] - occupied[0] + 1)
    return float(best)
