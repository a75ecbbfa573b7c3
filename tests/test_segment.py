"""Segmentation: the threshold backend on a tiny synthetic chest, the registry, adapter label mappings."""

from __future__ import annotations

import numpy as np
import pytest

from medsyn.data.segment import available_backends, dice, get_backend, segment
from medsyn.data.segment.lungmask import lobes_from_lungmask, lungmask_to_ras, ras_to_lungmask
from medsyn.data.segment.threshold import ThresholdSegmenter
from medsyn.data.segment.totalsegmentator import lobes_from_total, masks_from_total
from medsyn.errors import ConfigError, MedsynError


def tiny_chest(size: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """A RAS chest at 1 voxel = 1 unit: body, two lungs, trachea + main bronchi, a vessel per lung."""
    rng = np.random.default_rng(seed)
    x, y, z = np.indices((size, size, size)).astype(np.float32) - (size - 1) / 2
    s = size / 40.0
    body = (x / (17 * s)) ** 2 + (y / (13 * s)) ** 2 <= 1
    lungs = {}
    for side, cx in (("left", -8 * s), ("right", 8 * s)):
        lungs[side] = ((x - cx) / (6 * s)) ** 2 + (y / (9 * s)) ** 2 + ((z + 2 * s) / (14 * s)) ** 2 <= 1
    trachea = (x**2 + (y - 0) ** 2 <= (3 * s) ** 2) & (z >= 6 * s)
    bronchi = np.zeros_like(trachea)
    for cx in (-5 * s, 5 * s):
        t = np.clip((z - 6 * s) / (-4 * s), 0, 1)  # from the carina down and out
        bronchi |= ((x - cx * t) ** 2 + y**2 <= (2 * s) ** 2) & (z <= 6 * s) & (z >= 2 * s)
    airway = (trachea | bronchi) & body
    vessels = np.zeros_like(body)
    for cx in (-8 * s, 8 * s):
        vessels |= ((x - cx) ** 2 + (y - 2 * s) ** 2 <= (1.2 * s) ** 2) & (np.abs(z + 2 * s) < 8 * s)
    lung = lungs["left"] | lungs["right"]
    vessels &= lung
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[lung] = -850.0
    hu[vessels] = 40.0
    hu[airway] = -1000.0
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return {"hu": hu, "left": lungs["left"], "right": lungs["right"], "airway": airway, "vessels": vessels}


@pytest.fixture(scope="module")
def chest() -> dict[str, np.ndarray]:
    return tiny_chest()


@pytest.fixture(scope="module")
def result(chest) -> dict[str, np.ndarray]:
    return ThresholdSegmenter()(chest["hu"], np.eye(4))


def test_threshold_lungs_sides_and_lobes(chest, result):
    lobes = result["lobes"]
    assert lobes.dtype == np.uint8 and set(np.unique(lobes)) == {0, 1, 2, 3, 4, 5}
    assert dice(np.isin(lobes, [1, 2]), chest["left"]) > 0.85  # RAS: the left lung lies at small x
    assert dice(np.isin(lobes, [3, 4, 5]), chest["right"]) > 0.85
    # geometry: upper lobes above lower lobes, the middle lobe anterior to the right lower lobe
    centre = {label: np.argwhere(lobes == label).mean(0) for label in range(1, 6)}
    assert centre[1][2] > centre[2][2] and centre[3][2] > centre[5][2]
    assert centre[4][1] > centre[5][1] and centre[3][2] > centre[4][2]


def test_threshold_airway_and_vessels(chest, result):
    assert dice(result["airway"], chest["airway"]) > 0.7
    assert not (result["airway"] & result["vessels"]).any()
    assert dice(result["vessels"], chest["vessels"]) > 0.6
    assert not (result["vessels"].astype(bool) & ~(result["lobes"] > 0)).any()


def test_threshold_empty_volume():
    out = ThresholdSegmenter()(np.full((16, 16, 16), -1000.0, np.float32), np.eye(4))
    assert all(not m.any() for m in out.values())


def test_segment_keeps_given_masks_and_fills_the_rest(chest):
    given = {"airway": chest["airway"].astype(np.uint8)}
    lobes_only = lambda hu, affine: {"lobes": (chest["left"] * 1 + chest["right"] * 3).astype(np.uint8)}  # noqa: E731
    masks = segment(chest["hu"], np.eye(4), lobes_only, given=given)
    assert set(masks) == {"lobes", "airway", "vessels"}
    np.testing.assert_array_equal(masks["airway"], given["airway"])
    np.testing.assert_array_equal(np.unique(masks["lobes"]), [0, 1, 3])  # the backend's lobes, untouched
    assert masks["vessels"].any() and not (masks["vessels"].astype(bool) & ~(masks["lobes"] > 0)).any()


def test_registry():
    assert {"threshold", "totalsegmentator", "lungmask"} <= set(available_backends())
    assert isinstance(get_backend("threshold"), ThresholdSegmenter)
    with pytest.raises(ConfigError, match="unknown segmentation backend 'nope'"):
        get_backend("nope")


@pytest.mark.parametrize("name", ["totalsegmentator", "lungmask"])
def test_missing_package_names_install_command(name: str):
    package = {"totalsegmentator": "totalsegmentator", "lungmask": "lungmask"}[name]
    try:
        __import__(package)
        pytest.skip(f"{package} is installed")
    except ImportError:
        pass
    with pytest.raises(MedsynError, match=r"pip install medsyn\[seg\]"):
        get_backend(name)


def test_totalsegmentator_label_maps():
    # v2 `total`: 5 spleen, 10..14 lobes, 16 trachea, 51 heart; `lung_vessels`: 1 vessels, 2 airway
    total = np.array([[0, 5, 10, 11, 12, 13, 14, 16, 51]])
    np.testing.assert_array_equal(lobes_from_total(total), [[0, 0, 1, 2, 3, 4, 5, 0, 0]])
    v1 = np.array([13, 14, 15, 16, 17, 10, 43])  # `total_v1`: lobes at 13..17, 10 pancreas, 43 trachea
    np.testing.assert_array_equal(lobes_from_total(v1, version=1), [1, 2, 3, 4, 5, 0, 0])
    vessels_task = np.array([[0, 1, 2, 0, 0, 0, 1, 0, 0]])
    masks = masks_from_total(total, vessels_task)
    np.testing.assert_array_equal(masks["airway"], [[0, 0, 1, 0, 0, 0, 0, 1, 0]])  # bronchia + trachea
    np.testing.assert_array_equal(masks["vessels"], [[0, 1, 0, 0, 0, 0, 1, 0, 0]])
    with pytest.raises(ValueError, match="version"):
        lobes_from_total(total, version=3)


def test_lungmask_layout_and_labels():
    ras = np.zeros((6, 4, 5), np.uint8)
    ras[:3] = 1  # patient's left lung at small RAS x
    ras[3:] = 3
    ras[3:, :, 0] = 5  # right lower lobe at the bottom
    zyx = ras_to_lungmask(ras)
    assert zyx.shape == (5, 4, 6)
    assert zyx[:, :, -1].max() == 1 and zyx[:, :, 0].min() == 3  # LPS: x grows toward the left
    np.testing.assert_array_equal(lungmask_to_ras(zyx), ras)
    np.testing.assert_array_equal(lobes_from_lungmask(zyx), ras)
    with pytest.raises(ValueError, match="LTRCLobes labels"):
        lobes_from_lungmask(np.full((2, 2, 2), 7))
