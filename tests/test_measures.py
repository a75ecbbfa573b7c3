"""Clinical measures from the CT alone, against phantom truth at 2 mm (128^3) and 4 mm (64^3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsyn.data.cache import downsample
from medsyn.data.channels import LOBE_NAMES, decode_volume, encode_volume
from medsyn.data.phantom import Lesion, PathologyParams, generate_phantom
from medsyn.evaluation.measures import MEASURES, UNITS, measure_volume

P = PathologyParams
CASES = {
    "normal": P(),
    "small_left": P(effusion="small", effusion_side="left"),
    "moderate_right_consolidation": P(effusion="moderate", effusion_side="right", consolidation=[5]),
    "large_bilateral_cardiomegaly": P(effusion="large", effusion_side="bilateral", ctr=0.65),
    "large_left_cardiomegaly": P(effusion="large", effusion_side="left", ctr=0.7),
    "small_heart_consolidation": P(ctr=0.38, consolidation=[2]),
    "emphysema_upper_left_bullae": P(emphysema_lobe=1, emphysema_fraction=0.1, bullae=2),
    "emphysema_upper_right_severe": P(emphysema_lobe=3, emphysema_fraction=0.3, bullae=2),
    "emphysema_lower_right": P(emphysema_lobe=5, emphysema_fraction=0.2),
    "emphysema_lower_left_mild_bulla": P(emphysema_lobe=2, emphysema_fraction=0.08, bullae=1),
    "bullae_only": P(bullae=2),
}
SIZES = (64, 128)


def ctr_tolerance(spacing_mm: float) -> float:
    """0.03 at 2 mm and finer. At 4 mm one voxel is ~0.025 of the ratio and the heart's border is off by up
    to two voxels on some phantoms (blood and chest-wall muscle share a density; veins join the heart), so
    the target of 0.03 is not met everywhere there: 0.055 is the largest error on 70 random phantoms."""
    return 0.03 if spacing_mm <= 2.0 else 0.06


def _check(truth: dict, m: dict) -> None:
    for ours, theirs in (
        ("effusion_ml", "effusion_ml"),
        ("effusion_left_ml", "effusion_ml_left"),
        ("effusion_right_ml", "effusion_ml_right"),
    ):
        assert abs(m[ours] - truth[theirs]) <= max(50.0, 0.15 * truth[theirs]), (ours, m[ours], truth[theirs])
    assert abs(m["ctr"] - truth["ctr"]) <= ctr_tolerance(truth["spacing_mm"]), (m["ctr"], truth["ctr"])
    assert abs(m["laa950_pct"] - truth["laa950_percent"]) <= 1.0, (m["laa950_pct"], truth["laa950_percent"])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_measures_match_phantom_truth(size, name):
    phantom = generate_phantom(size, seed=[11, 0], params=CASES[name])
    _check(phantom.truth, measure_volume(phantom.ct, phantom.affine))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["normal", "emphysema_upper_right_severe", "large_left_cardiomegaly"])
def test_measures_at_paper_scale(name):
    """256^3 at 1 mm, the SR output grid (about 30 s a case on 2 cores: `pytest -m slow`)."""
    params = CASES.get(name, PathologyParams())
    phantom = generate_phantom(256, seed=[11, 0], params=params)
    _check(phantom.truth, measure_volume(phantom.ct, phantom.affine))


@pytest.mark.parametrize("index", [0, 1, 2, 3, 9, 11])  # 3, 9, 11: emphysema (11 with bullae)
def test_measures_on_sampled_phantoms(index):
    phantom = generate_phantom(64, seed=[12, index])
    _check(phantom.truth, measure_volume(phantom.ct, phantom.affine))


@pytest.mark.parametrize("index", range(6))
def test_ctr_on_sampled_phantoms_at_2mm(index):
    phantom = generate_phantom(128, seed=[1, index])
    assert abs(measure_volume(phantom.ct, phantom.affine)["ctr"] - phantom.truth["ctr"]) <= 0.03


def test_airway_leak_into_emphysema_is_lung():
    """The grown airway leaks into bullae; those voxels count as lung, the real lumen does not."""
    phantom = generate_phantom(64, seed=[11, 0], params=CASES["emphysema_upper_right_severe"])
    m = measure_volume(phantom.ct, phantom.affine)
    true_mm3 = float(phantom.airway.sum()) * 64.0  # 4 mm voxels
    assert m["airway_leak_mm3"] > 0.5 * true_mm3
    assert 0.8 * true_mm3 < m["airway_mm3"] - m["airway_leak_mm3"] < 1.3 * true_mm3
    normal = generate_phantom(64, seed=[11, 0], params=P())
    normal = measure_volume(normal.ct, normal.affine)
    assert normal["airway_leak_mm3"] < 0.1 * normal["airway_mm3"]


def test_effusion_sides_follow_world_x():
    """A left effusion is measured on the patient's left (x < 0), whichever way the array runs."""
    phantom = generate_phantom(64, seed=[11, 1], params=P(effusion="large", effusion_side="left"))
    m = measure_volume(phantom.ct, phantom.affine)
    assert m["effusion_left_ml"] > 100 and m["effusion_right_ml"] < 10
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = phantom.ct.shape[0] - 1
    flipped = measure_volume(phantom.ct[::-1].copy(), phantom.affine @ flip)
    assert flipped["effusion_left_ml"] == pytest.approx(m["effusion_left_ml"], rel=0.05)


@pytest.mark.parametrize("size", SIZES)
def test_nodule_found_in_its_lobe(size):
    phantom = generate_phantom(size, seed=[11, 2], params=P(lesions=[Lesion(3, 20.0)]))
    truth = phantom.truth["lesions"][0]
    m = measure_volume(phantom.ct, phantom.affine)
    assert m["nodule_count"] == 1
    found = m["nodules"][0]
    assert found["lobe"] == 3 and found["lobe_name"] == LOBE_NAMES[3]
    assert 0.5 * truth["volume_ml"] <= found["volume_ml"] <= 1.5 * truth["volume_ml"]
    assert np.linalg.norm(np.subtract(found["center_mm"], truth["center_mm"])) < 6.0


@pytest.mark.parametrize("size", SIZES)
def test_no_nodules_without_lesions(size):
    phantom = generate_phantom(size, seed=[11, 3], params=P(consolidation=[4], effusion="moderate"))
    assert measure_volume(phantom.ct, phantom.affine)["nodule_count"] == 0


def test_mask_keys_and_json():
    phantom = generate_phantom(64, seed=[11, 4], params=P(effusion="small"))
    plain = measure_volume(phantom.ct, phantom.affine)
    assert not any(key.startswith("mask_") or key.endswith("_dice") for key in plain)
    masks = {"lobes": phantom.lobes, "airway": phantom.airway, "vessels": phantom.vessels}
    m = measure_volume(phantom.ct, phantom.affine, masks=masks)
    assert m["lobe_lung_dice"] > 0.95 and m["vessel_dice"] > 0.6 and m["airway_dice"] > 0.5
    assert m["mask_lung_ml"] == pytest.approx(phantom.truth["lung_volume_ml"], abs=1.0)
    assert m["mask_lobe_ml"] == pytest.approx(phantom.truth["lobe_volume_ml"], abs=1.0)
    only_lobes = measure_volume(phantom.ct, phantom.affine, masks={"lobes": phantom.lobes})
    assert "lobe_lung_dice" in only_lobes and "airway_dice" not in only_lobes
    assert json.loads(json.dumps(m)) == m
    assert set(LOBE_NAMES.values()) == set(m["lobe_ml"])
    assert set(MEASURES) <= set(m) | {k for k in UNITS if k.startswith("mask_") or k.endswith("_dice")}
    assert set(MEASURES) <= set(UNITS)


@pytest.mark.parametrize("name", ["normal", "large_left_cardiomegaly", "large_bilateral_cardiomegaly"])
def test_effusion_on_the_8mm_base_grid(name):
    """The base model's grid (32^3 block means of a 2 mm phantom): before the coarse-grid opening, the chest
    wall's partial volume with lung read as 80-740 mL of fluid in normal chests."""
    from medsyn.data.channels import decode_ct, downsample, encode_ct
    from medsyn.data.nifti import spacing_affine

    phantom = generate_phantom(size=128, seed=[7, 1], params=CASES[name])
    hu = decode_ct(downsample(encode_ct(phantom.ct.astype(np.float32))[None], 4, ["ct"])[0])
    m = measure_volume(hu, spacing_affine(8.0, hu.shape), {})
    truth = phantom.truth["effusion_ml"]
    assert abs(m["effusion_ml"] - truth) <= max(60.0, 0.25 * truth), (m["effusion_ml"], truth)


@pytest.mark.parametrize("index", [3, 21, 43])
def test_ctr_on_the_8mm_base_grid(index):
    """The phantom recipe's base grid (4^3 block means of 2 mm phantoms, as the cache makes it). The heart
    reaches its widest on several 8 mm slices, the lowest at the narrow lung base, and its lowest slices
    merge with the liver below the lungs: these phantoms read 0.73, 1.0 and 1.0 when the CTR was taken on
    the first widest slice (truth 0.43-0.59); now on the widest flanked slice with the widest thorax."""
    phantom = generate_phantom(128, seed=[0, index])
    stack = encode_volume({"ct": phantom.ct, "lobes": phantom.lobes, "airway": phantom.airway,
                           "vessels": phantom.vessels})  # fmt: skip
    hu = decode_volume(downsample(stack, 4))["ct"].astype(np.float32)
    affine = phantom.affine.copy()
    affine[:3, :3] *= 4.0
    assert abs(measure_volume(hu, affine)["ctr"] - phantom.truth["ctr"]) <= 0.1
