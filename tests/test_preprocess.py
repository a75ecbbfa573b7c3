"""Preprocessing: RAS output, markers land at their world position, masks stay labels, HU window."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medsyn.data.channels import encode_ct, encode_volume
from medsyn.data.preprocess import PreprocessConfig, apply_rescale, override_spacing, to_grid
from medsyn.errors import ConfigError


def rotation(angle: float, axis: int) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


AFFINES = {
    "flipped": np.diag([-1.5, 2.0, -1.2]),
    "permuted": np.array([[0.0, 0.0, -1.4], [1.1, 0.0, 0.0], [0.0, -0.9, 0.0]]),
    "oblique": rotation(0.3, 2) @ rotation(-0.2, 0) @ np.diag([1.3, -1.1, 1.7]),
}


def centre_of_mass(weights: np.ndarray) -> np.ndarray:
    idx = np.indices(weights.shape).reshape(3, -1)
    return (idx * weights.reshape(-1)).sum(1) / weights.sum()


def world(affine: np.ndarray, voxel) -> np.ndarray:
    return (affine @ np.r_[np.asarray(voxel, float), 1.0])[:3]


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("fit", ["crop", "resize"])
def test_marker_lands_at_its_world_position(name: str, fit: str):
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = AFFINES[name], [10.0, -20.0, 5.0]
    ct = np.full((20, 22, 18), -1000.0, np.float32)
    lobes = np.zeros(ct.shape, np.uint8)
    ct[5:7, 14:16, 11:13] = 1000.0
    lobes[5:7, 14:16, 11:13] = 4
    target = world(affine, [5.5, 14.5, 11.5])
    out_ct, masks, out_affine = to_grid(ct, affine, {"lobes": lobes}, PreprocessConfig(size=32, fit=fit))
    assert out_ct.shape == (32, 32, 32) and masks["lobes"].dtype == np.uint8
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    np.testing.assert_allclose(out_affine[:3, :3], np.diag(np.diag(out_affine[:3, :3])), atol=1e-6)
    spacing = np.diag(out_affine[:3, :3])
    np.testing.assert_allclose(
        world(out_affine, centre_of_mass(np.clip(out_ct + 1000, 0, None))), target, atol=0.5 * spacing.max()
    )
    assert set(np.unique(masks["lobes"])) == {0, 4}  # nearest neighbour: no new labels
    np.testing.assert_allclose(
        world(out_affine, centre_of_mass(masks["lobes"] > 0)), target, atol=1.0 * spacing.max()
    )


def test_padding_is_air_and_crop_keeps_spacing():
    ct = np.zeros((10, 10, 10), np.float32)  # water, smaller than the target
    out, _, affine = to_grid(ct, np.diag([2.0, 2.0, 2.0, 1.0]), {}, PreprocessConfig(size=32, spacing_mm=1.0))
    np.testing.assert_allclose(np.diag(affine)[:3], 1.0)
    assert out[0, 0, 0] == pytest.approx(-1024.0) and out[16, 16, 16] == pytest.approx(0.0)


@pytest.mark.parametrize("filename", ["anatomical.nii", "standard.nii.gz", "example4d.nii.gz"])
def test_nibabel_test_images_come_out_ras(filename: str):
    image = nib.load(Path(data_path) / filename)
    array = np.asarray(image.dataobj, dtype=np.float32)
    array = array[..., 0] if array.ndim == 4 else array  # example4d: oblique, first frame
    peak = np.unravel_index(np.argmax(array), array.shape)
    smooth_peak = world(image.affine, peak)
    out, _, affine = to_grid(array, image.affine, {}, PreprocessConfig(size=48, spacing_mm=2.0))
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and out.shape == (48, 48, 48)
    # the brightest input voxel's world position holds a value close to the input maximum
    voxel = np.rint(np.linalg.solve(affine, np.r_[smooth_peak, 1.0])[:3]).astype(int)
    if np.all((voxel >= 0) & (voxel < 48)):
        neighbourhood = out[tuple(slice(max(v - 1, 0), v + 2) for v in voxel)]
        assert neighbourhood.max() >= 0.5 * float(array.max())


def test_prepared_channels_use_the_hu_window():
    hu = np.array([-3000.0, -1024.0, -212.0, 600.0, 3000.0], np.float32)
    np.testing.assert_allclose(encode_ct(hu), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
    stack = encode_volume(
        {"ct": hu, "lobes": np.array([0, 1, 2, 3, 5]), "airway": np.ones(5), "vessels": np.zeros(5)}
    )
    assert stack.shape == (4, 5) and stack.dtype == np.float32
    np.testing.assert_allclose(stack[1], [0.0, -0.5, -1.0, 1 / 3, 1.0], atol=1e-6)  # LOBE_LEVELS
    assert (stack[2] == 1).all() and (stack[3] == -1).all()


def test_rescale_and_spacing_override():
    np.testing.assert_allclose(apply_rescale(np.array([0.0, 1024.0]), 1.0, -1024.0), [-1024.0, 0.0])
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [5, 6, 7]
    new = override_spacing(affine, (0.75, 0.75, 1.5))
    np.testing.assert_allclose(np.diag(new)[:3], [-0.75, 0.75, 1.5])
    np.testing.assert_allclose(new[:3, 3], [5, 6, 7])


def test_config_validation():
    with pytest.raises(ConfigError, match="fit"):
        PreprocessConfig(fit="stretch")
    with pytest.raises(ConfigError, match="spacing_mm"):
        PreprocessConfig(spacing_mm=0.0)
    assert PreprocessConfig(size=(8, 16, 32)).shape == (8, 16, 32)
