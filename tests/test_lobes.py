"""Lobe label maps with the lungs in mind: specks, holes, sides, wrong-side lobes, pieces, border rings."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from medsyn.data.channels import decode_lobes, encode_lobes, nearest_level
from medsyn.data.lobes import clean_lobes, lungs, right_lung
from medsyn.data.phantom import generate_phantom


def two_lungs(size: int = 24, gap: int = 2) -> np.ndarray:
    """Two box lungs along RAS x: left (x < size/2) upper 1 over lower 2, right 3 over 4 over 5."""
    labels = np.zeros((size,) * 3, np.uint8)
    half, z = size // 2, np.arange(size)[None, None, :]
    left = np.zeros_like(labels, bool)
    left[2 : half - gap // 2, 3:-3, 2:-2] = True
    right = np.zeros_like(labels, bool)
    right[half + (gap + 1) // 2 : -2, 3:-3, 2:-2] = True
    labels[left] = np.broadcast_to(np.where(z >= half, 1, 2), labels.shape)[left]
    labels[right] = np.broadcast_to(np.where(z >= 16, 3, np.where(z >= 10, 4, 5)), labels.shape)[right]
    return labels


def clean(labels: np.ndarray) -> np.ndarray:
    """`clean_lobes` with each label's own level as its decoded value."""
    return clean_lobes(labels, nearest_level(encode_lobes(labels)))


def test_lungs_drop_specks_and_fill_enclosed_background():
    truth = two_lungs() > 0
    mask = truth.copy()
    mask[0, 0, 0] = mask[23, 12, 12] = True  # specks
    mask[5, 10, 10] = mask[16, 12, 8:10] = False  # holes
    mask[0:3, 10, 10] = False  # a dent open to the outside stays
    expected = truth.copy()
    expected[0:3, 10, 10] = False
    np.testing.assert_array_equal(lungs(mask), expected)


def test_a_shell_of_labels_along_the_skin_is_not_a_lung():
    """Bug: the 128^3 demo samples kept a 1-voxel ring of lobe labels along the skin as a third 'lung'."""
    phantom = generate_phantom(size=48, seed=5)
    body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(phantom.ct > -500, 2, 0)], axis=2)
    skin = body & ~ndimage.binary_erosion(body, structure=np.ones((3, 3, 1), bool))  # the outline, per slice
    labels = phantom.lobes.copy()
    labels[skin & (labels == 0)] = 3
    assert (skin & (labels == 3)).sum() > 0.2 * (phantom.lobes > 0).sum()  # as big as a lung
    out = clean(labels)
    assert not out[skin & (phantom.lobes == 0)].any()
    assert (out[phantom.lobes > 0] == phantom.lobes[phantom.lobes > 0]).mean() > 0.95


def test_right_lung_by_the_labels_of_each_component_and_split_where_they_touch():
    labels = two_lungs()
    labels[5, 10, 10] = 4  # a wrong-side voxel is outvoted by its lung
    right = right_lung(labels, labels > 0)
    np.testing.assert_array_equal(right, two_lungs() >= 3)
    touching = two_lungs(gap=0)
    assert ndimage.label(touching > 0)[1] == 1
    split = right_lung(touching, touching > 0)
    np.testing.assert_array_equal(split, touching >= 3)


def test_wrong_side_lobes_become_the_nearest_own_lobe_and_stray_pieces_are_refilled():
    truth = two_lungs()
    labels = truth.copy()
    labels[6:9, 8:11, 16:19] = 4  # a right lobe inside the left upper lobe
    labels[16:19, 8:11, 18:21] = 5  # a stray right lower piece inside the right upper lobe
    labels[16, 8, 18] = 1  # and a left lobe in it
    out = clean(labels)
    np.testing.assert_array_equal(out, truth)
    values = encode_lobes(labels)
    values[6:9, 8:11, 16:19] = -0.9  # near left lower's level: a piece of left lower inside left upper
    out = clean_lobes(labels, nearest_level(values))
    np.testing.assert_array_equal(out, truth)  # the nearest own lobe, then refilled as a stray piece


def test_the_border_ring_is_refilled_from_the_interior():
    truth = two_lungs()
    labels = truth.copy()
    border = (truth > 0) & ~ndimage.binary_erosion(truth > 0)
    labels[border & (truth >= 3)] = 3  # a smooth right lower - background border passes through upper
    labels[border & (truth == 2)] = 1  # (and a left lower one through left upper)
    np.testing.assert_array_equal(clean(labels), truth)


def test_a_noisy_phantom_comes_back_with_one_piece_per_lobe():
    truth = generate_phantom(size=48, seed=5).lobes
    noise = np.random.default_rng(1).normal(0, 0.1, truth.shape).astype(np.float32)
    values = ndimage.gaussian_filter(encode_lobes(truth), 1.0) + noise
    plain = decode_lobes(values).astype(np.uint8)
    out = clean_lobes(plain, nearest_level(values))
    lobe = truth > 0
    assert (out[lobe] == truth[lobe]).mean() > (plain[lobe] == truth[lobe]).mean()
    assert [ndimage.label(out == k)[1] for k in range(1, 6)] == [1] * 5
    assert [ndimage.label(plain == k)[1] for k in range(1, 6)] != [1] * 5
    assert not clean_lobes(np.zeros((4, 4, 4), np.uint8), nearest_level(np.zeros((4, 4, 4)))).any()


@pytest.mark.slow
def test_clean_lobes_takes_seconds_at_256():
    truth = np.repeat(np.repeat(np.repeat(generate_phantom(size=64, seed=0).lobes, 4, 0), 4, 1), 4, 2)
    rng = np.random.default_rng(0)
    values = encode_lobes(truth) + rng.normal(0, 0.1, truth.shape).astype(np.float32)
    began = time.perf_counter()
    out = clean_lobes(decode_lobes(values).astype(np.uint8), nearest_level(values))
    assert time.perf_counter() - began < 15.0
    assert (out[truth > 0] == truth[truth > 0]).mean() > 0.97
