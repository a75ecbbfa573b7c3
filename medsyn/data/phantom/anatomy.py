"""The phantom's normal anatomy as analytic shapes in world millimetres (RAS+).

RAS+ as in nibabel and `spacing_affine`: +x is the patient's Right, +y Anterior, +z Superior,
so the patient's left lung lies at x < 0. Every function takes broadcastable coordinate arrays,
which lets the same code fill a voxel grid (x (S,1,1), y (1,S,1), z (1,1,S)) or test points (N,).
Sizes are those of a small adult chest that fits a 256 mm field of view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEFT, RIGHT = -1.0, 1.0  # sign of x on the patient's left / right


@dataclass
class Anatomy:
    """Sampled shape parameters of one normal chest (mm); functions evaluate its regions."""

    body_a: float  # body half-width
    body_b: float  # body half-depth
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest-wall muscle thickness
    cav_a: float  # pleural cavity half-width
    cav_b: float  # pleural cavity half-depth
    cav_y: float  # pleural cavity centre (y)
    dome_left: float  # top of the left hemidiaphragm (z)
    dome_right: float
    apex_z: float  # top of the lung apices
    heart_c: tuple[float, float, float]  # heart centre
    heart_axes: tuple[float, float, float]  # semi-axes: long (in-plane), short, cranio-caudal
    heart_angle: float  # long axis angle from the x axis towards anterior (radians)
    oblique: tuple[tuple[float, float, float], tuple[float, float, float]]  # per side (y0, z0, slope)
    horizontal_z: float  # right horizontal fissure height
    carina_z: float

    # ---- landmarks derived from the shape parameters -------------------------------------
    @property
    def cav_post(self) -> float:
        """Posterior wall of the pleural cavity (y)."""
        return self.cav_y - self.cav_b

    @property
    def vertebra_y(self) -> float:
        return self.cav_post + 8.0

    @property
    def trachea_y(self) -> float:
        return self.cav_post + 48.0

    # ---- regions -------------------------------------------------------------------------
    def body(self, x, y, inset: float = 0.0):
        """Inside the body outline shrunk by `inset` mm (a rounded-rectangle superellipse)."""
        a, b = self.body_a - inset, self.body_b - inset
        return (np.abs(x) / a) ** 2.6 + (np.abs(y) / b) ** 2.6 <= 1.0

    def cavity(self, x, y, grow: float = 0.0):
        """Inside the bony thorax's inner outline (the pleural cavity and mediastinum)."""
        a, b = self.cav_a + grow, self.cav_b + grow
        return (np.abs(x) / a) ** 2.3 + (np.abs(y - self.cav_y) / b) ** 2.3 <= 1.0

    def diaphragm(self, x, y):
        """Height (z) of the diaphragm under each hemithorax: domes, deepest postero-laterally."""
        top = np.where(x < 0, self.dome_left, self.dome_right)
        lateral = ((np.abs(x) - 38.0) / 42.0) ** 2
        depth = (y - self.cav_y) / self.cav_b
        return top - 30.0 * lateral - 18.0 * depth**2 - 14.0 * np.clip(-depth, 0.0, 1.0)

    def heart(self, x, y, z, grow: float = 0.0):
        """Inside the heart ellipsoid (its long axis points to the left, anteriorly)."""
        cx, cy, cz = self.heart_c
        a, b, c = (s + grow for s in self.heart_axes)
        cos, sin = float(np.cos(self.heart_angle)), float(np.sin(self.heart_angle))
        u = (x - cx) * (LEFT * cos) + (y - cy) * sin
        v = -(x - cx) * (LEFT * sin) + (y - cy) * cos
        return (u / a) ** 2 + (v / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0

    def heart_half_width(self) -> float:
        """Half of the heart's transverse (x) extent, as the CTR measures it."""
        a, b, _ = self.heart_axes
        return float(np.hypot(a * np.cos(self.heart_angle), b * np.sin(self.heart_angle)))

    def spine(self, x, y):
        """Vertebral body, pedicles/laminae and spinous process outline in the axial plane."""
        vy = self.vertebra_y
        body = x**2 + (y - vy) ** 2 <= 15.0**2
        arch = (np.abs(x) <= 12.0) & (y <= vy - 10.0) & (y >= vy - 34.0)
        spinous = (np.abs(x) <= 4.0) & (y <= vy - 20.0) & (y >= vy - 46.0)
        transverse = (np.abs(x) <= 30.0) & (np.abs(y - (vy - 24.0)) <= 4.0)
        return body, arch | spinous | transverse

    def spinal_canal(self, x, y):
        return x**2 + (y - (self.vertebra_y - 22.0)) ** 2 <= 8.0**2

    def lung(self, x, y, z, excluded=None):
        """Inside either lung (the pleural space before any effusion).

        `excluded` marks the mediastinal tubes (aorta, trachea, ...) grown by 3 mm, e.g. from
        `rasterize_tubes(grid, tubes, grow=3.0)`; the lungs keep out of it.
        """
        inside = self.cavity(x, y) & (z > self.diaphragm(x, y))
        # mediastinum: a midline band, wider posteriorly, and the spine and heart with fat around
        depth = np.clip((self.cav_y + self.cav_b - y) / (2.0 * self.cav_b), 0.0, 1.0)
        inside = inside & (np.abs(x) > 5.0 + 12.0 * depth)
        inside = inside & ~(x**2 + (y - self.vertebra_y) ** 2 <= 19.0**2)
        # apices: above z = 25 mm each lung narrows to a posterior dome ending at apex_z
        g = np.clip((z - 25.0) / (self.apex_z - 25.0), 0.0, 1.0)
        room = (1.0 - g**2) * (1.0 + 1.5 * (1.0 - g))
        ax = (np.abs(x) - 45.0) / 60.0
        ay = (y - (self.cav_y - 8.0)) / 55.0
        inside = inside & (ax**2 + ay**2 <= room) & (z < self.apex_z)
        inside = inside & ~self.heart(x, y, z, grow=4.0)
        if excluded is not None:
            inside = inside & ~excluded
        return inside

    def oblique_z(self, x, y, side: float):
        """Height of the oblique fissure: high posteriorly, reaching the base anteriorly."""
        y0, z0, slope = self.oblique[0 if side == LEFT else 1]
        return z0 + slope * (y0 - y) + 0.004 * (np.abs(x) - 45.0) ** 2

    def horizontal_z_at(self, x, y):
        return self.horizontal_z + 0.12 * y + 0.002 * (np.abs(x) - 45.0) ** 2

    def lobes(self, x, y, z, lung):
        """Lobe labels (0..5, see `medsyn.data.channels.LOBE_NAMES`) of the points in `lung`."""
        left = x < 0
        below_left = z < self.oblique_z(x, y, LEFT)
        below_right = z < self.oblique_z(x, y, RIGHT)
        above_horizontal = z > self.horizontal_z_at(x, y)
        label = np.where(
            left,
            np.where(below_left, 2, 1),
            np.where(below_right, 5, np.where(above_horizontal, 3, 4)),
        ).astype(np.uint8)
        return np.where(lung, label, 0).astype(np.uint8)

    def fissure_distance(self, x, y, z):
        """Approximate distance (mm) to the nearest fissure surface, for drawing fissure lines."""
        left = x < 0
        obl = np.where(left, self.oblique_z(x, y, LEFT), self.oblique_z(x, y, RIGHT))
        slope = np.where(left, self.oblique[0][2], self.oblique[1][2])
        d = np.abs(z - obl) / np.sqrt(1.0 + slope**2)
        horiz = np.abs(z - self.horizontal_z_at(x, y))
        horiz = np.where(left | (z < obl), np.inf, horiz)  # only in front of the right oblique
        return np.minimum(d, horiz)


def sample_anatomy(rng: np.random.Generator, ctr: float) -> Anatomy:
    """Draw one chest's shape; the heart is sized so that its CTR is close to `ctr`.

    The number of draws does not depend on `ctr`, so one seed gives one body whatever the heart.
    """
    u = rng.uniform
    scale = float(u(0.93, 1.0))
    body_a, body_b = 120.0 * scale, 98.0 * scale
    fat, muscle = float(u(7.0, 20.0)), float(u(8.0, 12.0))
    cav_a = body_a - fat - muscle - 13.0
    cav_b = body_b - fat - muscle - 16.0
    cav_y = 3.0
    dome_right = float(u(-46.0, -32.0))
    dome_left = dome_right - float(u(8.0, 16.0))
    apex_z = float(u(95.0, 108.0))
    angle = float(np.radians(u(32.0, 45.0)))
    aspect = float(u(0.62, 0.7))
    heart_y = float(cav_y + u(22.0, 30.0))
    heart_z = dome_left + float(u(6.0, 14.0))
    oblique = tuple((float(u(-52.0, -40.0)), float(u(62.0, 76.0)), float(u(1.1, 1.35))) for _ in range(2))
    horizontal_z = float(u(4.0, 16.0))
    carina_z = float(u(28.0, 40.0))
    # heart size from the target CTR (thoracic width ~ cavity width)
    half = ctr * cav_a
    long_axis = half / np.hypot(np.cos(angle), aspect * np.sin(angle))
    heart_x = LEFT * 0.3 * half
    heart_c = (float(heart_x), heart_y, heart_z)
    axes = (float(long_axis), float(aspect * long_axis), float(34.0 * np.sqrt(half / 36.0)))
    return Anatomy(
        body_a=body_a, body_b=body_b, fat=fat, muscle=muscle, cav_a=cav_a, cav_b=cav_b, cav_y=cav_y,
        dome_left=dome_left, dome_right=dome_right, apex_z=apex_z, heart_c=heart_c,
        heart_axes=axes, heart_angle=angle, oblique=oblique, horizontal_z=horizontal_z,
        carina_z=carina_z,
    )  # fmt: skip
