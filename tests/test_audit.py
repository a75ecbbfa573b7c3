"""Memorization audit: planted copies are flagged, real unseen volumes are not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsyn.data.phantom import generate_phantom
from medsyn.evaluation.audit import memorization_audit, nearest, plot_audit, voxel_signature
from medsyn.evaluation.features import build_feature_extractor


@pytest.fixture(scope="module")
def volumes():
    """8 training and 6 held-out 32^3 phantoms, a copy of train_3 and a noisy (10 HU) copy of train_5."""
    rng = np.random.default_rng(0)
    train = {f"train_{i}": generate_phantom(32, seed=[1, i]).ct for i in range(8)}
    heldout = {f"heldout_{i}": generate_phantom(32, seed=[2, i]).ct for i in range(6)}
    copies = {
        "copy_of_train_3": train["train_3"].copy(),
        "noisy_copy_of_train_5": (train["train_5"] + rng.normal(0, 10, train["train_5"].shape)).astype(
            np.int16
        ),
    }
    return train, heldout, copies


@pytest.fixture(scope="module")
def entries(volumes):
    extractor = build_feature_extractor(input_size=32, slice_size=32, slices_per_plane=2)

    def entry(hu):
        return {"features": extractor.features_3d(hu, 8.0), "voxels": voxel_signature(hu, size=16)}

    return tuple({k: entry(v) for k, v in group.items()} for group in volumes)


def test_voxel_signature_range_and_units():
    hu = np.full((40, 40, 40), -1000, dtype=np.int16)
    hu[10:30, 10:30, 10:30] = 3000  # clipped to 600
    sig = voxel_signature(hu, size=8)
    assert sig.shape == (512,) and sig.dtype == np.float32
    assert sig.min() >= -1 and sig.max() == pytest.approx(1.0)
    # RMS distance of a uniform shift within the window is that shift, whatever the size
    hu = np.full((40, 40, 40), -500, dtype=np.int16)
    hu[5:20, 10:30, 10:35] = 0
    for size in (8, 16):
        _, d = nearest(voxel_signature(hu, size)[None], voxel_signature(hu + 100, size)[None], metric="rms")
        assert d[0] == pytest.approx(100 / 1624 * 2, rel=1e-4)


def test_nearest_skips_same_id():
    refs = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    idx, dist = nearest(refs, refs, ["a", "b", "c"], ["a", "b", "c"])
    assert idx.tolist() == [1, 0, 1] and dist.tolist() == [1.0, 1.0, 4.0]
    idx, dist = nearest(refs, refs)
    assert idx.tolist() == [0, 1, 2] and dist.tolist() == [0.0, 0.0, 0.0]
    _, rms = nearest(refs[:1], refs[2:], metric="rms")
    assert rms[0] == pytest.approx(5 / np.sqrt(2))


def test_planted_copies_flagged_heldout_not(entries, tmp_path):
    train, heldout, copies = entries
    samples = {**copies, **heldout}
    result = memorization_audit(samples, train, heldout)
    assert sorted(result.near_copies) == ["copy_of_train_3", "noisy_copy_of_train_5"]
    assert result.samples["copy_of_train_3"]["nearest_train"] == {"id": "train_3", "distance": 0.0}
    assert result.samples["noisy_copy_of_train_5"]["nearest_train_voxels"]["id"] == "train_5"
    # with 6 reference values the 1st percentile is their minimum
    for space in ("features", "voxels"):
        assert result.thresholds[space] == result.reference_distances[space].min()
    assert not result.leave_one_out
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["n_near_copies"] == 2 and summary["samples"]["heldout_0"]["near_copy"] is False
    plot = tmp_path / "audit.png"
    plot_audit(result, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_copy_in_one_space_only_is_not_flagged(entries):
    train, heldout, _ = entries
    far = heldout["heldout_0"]
    samples = {
        "voxels_only": {"features": far["features"], "voxels": train["train_2"]["voxels"]},
        "features_only": {"features": train["train_2"]["features"], "voxels": far["voxels"]},
    }
    result = memorization_audit(samples, train, heldout)
    # a real copy is close in both spaces; closeness in one alone is chance (or a feature collision)
    assert not result.samples["voxels_only"]["near_copy"] and not result.samples["features_only"]["near_copy"]
    assert result.samples["voxels_only"]["nearest_train_voxels"] == {"id": "train_2", "distance": 0.0}


def test_leave_one_out_when_heldout_is_train(entries):
    train, heldout, copies = entries
    result = memorization_audit({**copies, **heldout}, train, train)
    assert result.leave_one_out
    assert (result.reference_distances["voxels"] > 0).all()  # no volume was its own neighbour
    assert {"copy_of_train_3", "noisy_copy_of_train_5"} <= set(result.near_copies)


def test_too_few_heldout_is_an_error(entries):
    train, heldout, _ = entries
    with pytest.raises(ValueError, match="at least 2 held-out"):
        memorization_audit(heldout, train, {"heldout_0": heldout["heldout_0"]})
