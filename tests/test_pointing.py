"""The pointing game (`medsyn.alignment.pointing`, `benchmarks/alignment.py pointing`): the phantom's finding
regions, true regions of words, the hit rules, the random baseline and the p-value, and a run of the script
on a tiny align run over a tiny phantom cache."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from training_fixtures import align_overrides, make_text_model

from medsyn.alignment.pointing import (
    TARGETS,
    PointingCase,
    body_mask,
    body_patches,
    one_sided_p,
    patch_hits,
    point,
    summarise,
    target_masks,
    word_region,
)
from medsyn.data.nifti import spacing_affine
from medsyn.data.phantom import Lesion, PathologyParams, generate_phantom, phantom_from_truth, save_phantom
from medsyn.data.phantom.dataset import MANIFEST_COLUMNS
from medsyn.data.phantom.geometry import Grid
from medsyn.data.prepare import PrepareOptions, prepare
from medsyn.data.preprocess import PreprocessConfig
from medsyn.errors import DataError

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "alignment.py"
_spec = importlib.util.spec_from_file_location("alignment_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

SIZE = 48  # 5.33 mm voxels: no scanner blur, so with noise_hu=0 every drawn HU value stays exact
SICK = PathologyParams(effusion="moderate", effusion_side="left", lesions=[Lesion(3, 16.0), Lesion(5, 34.0)],
                       consolidation=[5], emphysema_lobe=1, emphysema_fraction=0.2, bullae=2)  # fmt: skip


@pytest.fixture(scope="module")
def sick():
    return generate_phantom(SIZE, seed=11, params=SICK, noise_hu=0.0)


# ---- the phantom's own regions ------------------------------------------------------------------------
def test_regions_are_what_the_phantom_drew(sick):
    regions, ct, lobes = sick.regions, sick.ct, sick.lobes
    # pleural fluid is the only tissue drawn at 12 HU; it is on the left (x < 0: low i) and has no lobe
    assert regions.effusion.any() and np.array_equal(regions.effusion, ct == 12)
    assert not lobes[regions.effusion].any()
    assert regions.effusion[SIZE // 2 :].sum() == 0
    assert regions.effusion.sum() * (256.0 / SIZE) ** 3 / 1000 == pytest.approx(
        sick.truth["effusion_ml"], abs=0.1
    )
    # lesions (40 HU, nothing else is) are labelled by their order in truth["lesions"], each around its centre
    assert np.array_equal(regions.lesions > 0, ct == 40)
    grid = Grid(SIZE, 256.0 / SIZE)
    assert len(sick.truth["lesions"]) == 2
    for n, lesion in enumerate(sick.truth["lesions"], start=1):
        centre = tuple(np.rint(grid.index(np.array(lesion["center_mm"]))).astype(int))
        assert regions.lesions[centre] == n
        assert (regions.lesions == n).sum() * grid.voxel_ml == pytest.approx(lesion["volume_ml"], rel=0.05)
    # consolidation: soft tissue (35 HU) in its lobe, the dependent (posterior) part of it; the mass drawn
    # on it later keeps it in the region
    right_lower, no_lesion = lobes == 5, regions.lesions == 0
    assert np.array_equal(regions.consolidation & no_lesion, (ct == 35) & right_lower & no_lesion)
    assert (regions.consolidation & ~no_lesion).any()
    j = np.arange(SIZE)[None, :, None]
    assert (j * regions.consolidation).sum() / regions.consolidation.sum() < (
        j * right_lower
    ).sum() / right_lower.sum()
    # bullae: air in the emphysematous lobe
    assert regions.bullae.any() and (ct[regions.bullae] == -1000).all() and (lobes[regions.bullae] == 1).all()
    assert regions.emphysema.any() and not regions.ground_glass.any()


def test_regions_of_an_absent_finding_are_empty():
    normal = generate_phantom(32, seed=2, params=PathologyParams())
    assert not any(getattr(normal.regions, name).any() for name in
                   ("effusion", "lesions", "bullae", "consolidation", "emphysema", "ground_glass"))  # fmt: skip


def test_phantom_from_truth_draws_the_same_regions(sick, tmp_path):
    save_phantom(tmp_path, sick)
    truth = json.loads((tmp_path / "truth.json").read_text())
    again = phantom_from_truth(truth, tmp_path / "truth.json")
    for name in ("effusion", "lesions", "bullae", "consolidation"):
        assert np.array_equal(getattr(again.regions, name), getattr(sick.regions, name))
    assert np.array_equal(again.lobes, sick.lobes)
    moved = {
        **truth,
        "lesions": [{**truth["lesions"][0], "center_mm": [0.0, 0.0, 0.0]}, *truth["lesions"][1:]],
    }
    with pytest.raises(DataError, match="draws seed 11 differently"):
        phantom_from_truth(moved, "moved.json")
    with pytest.raises(DataError, match="not a phantom truth"):
        phantom_from_truth({"size": 32}, "bad.json")


# ---- true regions of words ------------------------------------------------------------------------------
def test_word_regions(sick):
    masks = target_masks(sick.regions, sick.lobes)
    words = "Right upper lobe nodule . Moderate pleural effusion without pericardial effusion . upper".split()
    region, what = word_region(words, 1, masks)
    assert what == "right upper lobe" and np.array_equal(region, sick.lobes == 3)
    assert word_region(words, 3, masks)[1] == "nodule" and np.array_equal(word_region(words, 3, masks)[0],
                                                                         sick.regions.lesions > 0)  # fmt: skip
    assert np.array_equal(word_region(words, 7, masks)[0], sick.regions.effusion)
    assert not word_region(words, 10, masks)[0].any()  # "pericardial effusion": not the pleural fluid
    region, what = word_region(words, 12, masks)  # no side before it: both upper lobes
    assert what == "upper lobes (side not given)" and np.array_equal(region, np.isin(sick.lobes, [1, 3]))
    assert not word_region(["Moderate"], 0, masks)[0].any()
    assert word_region(["left", "LOWER"], 1, masks)[1] == "left lower lobe"
    assert {"effusion", "nodule", "consolidation", "bullae", "upper", "lower"} == set(TARGETS)
    assert {"mass", "lesion", "bulla"} <= set(TARGETS["nodule"]) | set(TARGETS["bullae"])


# ---- hit rules and chance -------------------------------------------------------------------------------
def test_overlap_and_centre_rules_on_hand_made_regions():
    grid, stride = (2, 2, 2), 4  # 8^3 voxels; patch p covers [4 p, 4 p + 4) per axis, C order
    region = np.zeros((8, 8, 8), bool)
    region[5, 1, 2] = True  # in patch (1, 0, 0) = token 4, one of its 2^3 central voxels {1, 2}^3 + offset
    hits = patch_hits(region, grid, stride)
    assert hits["overlap"].tolist() == [False] * 4 + [True] + [False] * 3
    assert hits["centre"].tolist() == hits["overlap"].tolist()
    region[:] = False
    region[4, 0, 3] = True  # in the same patch, at its corner: overlaps, centre outside
    hits = patch_hits(region, grid, stride)
    assert hits["overlap"][4] and not hits["centre"].any()
    region[3, 3, 3] = True  # the last voxel of token 0: boxes are half-open, it touches no other patch
    assert np.flatnonzero(patch_hits(region, grid, stride)["overlap"]).tolist() == [0, 4]
    odd = np.zeros((6, 3, 3), bool)  # stride 3: one central voxel per patch
    odd[4, 1, 1] = True
    assert patch_hits(odd, (2, 1, 1), 3)["centre"].tolist() == [False, True]
    odd[4, 1, 1], odd[4, 2, 1] = False, True
    hits = patch_hits(odd, (2, 1, 1), 3)
    assert hits["overlap"].tolist() == [False, True] and not hits["centre"].any()


def test_random_baseline_on_a_known_mask():
    grid, stride = (2, 2, 2), 4
    region = np.zeros((8, 8, 8), bool)
    region[0:2, 0:2, 0:2] = True  # token 0, its central voxel (1, 1, 1) included
    region[4, 4, 4] = True  # token 7, at its corner
    body = np.zeros((8, 8, 8), bool)
    body[:4] = True  # tokens 0-3 wholly inside, 4-7 outside
    body[4:, :, :1] = True  # a quarter of tokens 4, 6: under half, still outside
    assert body_patches(body, grid, stride).tolist() == [True] * 4 + [False] * 4
    similarity = np.array([0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.0, 0.3])
    chosen, hit, chance_body, chance_all = point(similarity, region, body, grid, stride)
    assert chosen == 1 and hit == {"overlap": False, "centre": False}
    # tokens 0 and 7 overlap, only token 0 by its centre; tokens 0-3 are the body's
    assert chance_all == {"overlap": 0.25, "centre": 0.125}
    assert chance_body == {"overlap": 0.25, "centre": 0.25}
    assert point(-similarity, region, body, grid, stride)[:2] == (3, {"overlap": False, "centre": False})
    assert point(np.eye(8)[0], region, body, grid, stride)[:2] == (0, {"overlap": True, "centre": True})
    assert point(np.eye(8)[7], region, body, grid, stride)[:2] == (7, {"overlap": True, "centre": False})


def test_body_fills_the_lungs_but_not_the_air_around():
    hu = np.full((12, 12, 4), -1000.0)
    hu[2:10, 2:10] = 40.0
    hu[4:8, 4:8] = -850.0  # lung inside the body wall
    body = body_mask(hu)
    assert body[2:10, 2:10].all() and body.sum() == 8 * 8 * 4


def test_summary_counts_every_word_and_tests_accuracy_above_chance():
    def case(target, hit, chance):
        return PointingCase("s", target, target, 0, target, 1, 0, 0.5, {"overlap": hit, "centre": False},
                            {"overlap": chance, "centre": 0.1}, {"overlap": chance / 2, "centre": 0.05})  # fmt: skip

    cases = [case("effusion", True, 0.2), case("effusion", True, 0.3), case("effusion", True, 0.2),
             case("effusion", False, 0.3)]  # fmt: skip
    summary = summarise(cases, {"bullae": 3})
    assert list(summary) == list(TARGETS)
    e = summary["effusion"]
    assert (e["cases"], e["subjects"], e["overlap"]["hits"], e["overlap"]["accuracy"]) == (4, 1, 3, 0.75)
    assert e["overlap"]["baseline_body"] == pytest.approx(0.25) and e["overlap"][
        "baseline_all"
    ] == pytest.approx(0.125)
    assert e["overlap"]["p_body"] == pytest.approx(4 * 0.25**3 * 0.75 + 0.25**4)  # P(X >= 3), X ~ B(4, 1/4)
    assert e["centre"]["hits"] == 0 and e["centre"]["p_body"] == pytest.approx(1.0)
    assert summary["bullae"]["cases"] == 0 and summary["bullae"]["absent_mentions"] == 3
    assert summary["bullae"]["overlap"]["accuracy"] is None and summary["bullae"]["overlap"]["p_body"] is None
    assert one_sided_p(5, 20, 0.1) == pytest.approx(stats.binom.sf(4, 20, 0.1))


# ---- the script, end to end -----------------------------------------------------------------------------
VARIANTS = [
    SICK,
    PathologyParams(effusion="small", effusion_side="right", lesions=[Lesion(1, 12.0)], consolidation=[2]),
]


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """8 phantoms at 64^3 (4 mm) with findings, prepared into a cache (16^3 base grid); test split: 2
    (phantom_0001 and phantom_0005, both with every target finding)."""
    base = tmp_path_factory.mktemp("pointing")
    phantoms = base / "phantoms"
    rows = []
    for i in range(8):
        subject = f"phantom_{i:04d}"
        phantom = generate_phantom(64, seed=[0, i], params=VARIANTS[(i + 1) % 2])  # test split: SICK
        save_phantom(phantoms / subject, phantom)
        rows.append({"id": subject, **{n: f"{subject}/{n}.nii.gz" for n in ("ct", "lobes", "airway", "vessels")},
                     "findings": phantom.report.findings, "impression": phantom.report.impression})  # fmt: skip
    with open(phantoms / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    options = PrepareOptions(preprocess=PreprocessConfig(size=64, spacing_mm=4.0), lr_factor=4,
                             split_fractions=(0.4, 0.2, 0.4), progress=False)  # fmt: skip
    result = prepare(phantoms / "manifest.csv", base / "cache", options)
    assert len(result.done) == 8
    return {"base": base, "phantoms": phantoms, "cache": base / "cache"}


def test_masks_come_onto_another_cache_grid(phantom_cache):
    meta = json.loads((phantom_cache["cache"] / "phantom_0001" / "meta.json").read_text())
    truth = bench.truth_file("phantom_0001", meta, None)  # next to the CT the cache was prepared from
    assert truth == bench.truth_file("phantom_0001", {}, phantom_cache["phantoms"])
    same = bench.masks_on_cache_grid(truth, meta, (64,) * 3)
    assert np.array_equal(
        same["effusion"], phantom_from_truth(json.loads(truth.read_text())).regions.effusion
    )
    coarse = bench.masks_on_cache_grid(
        truth, {**meta, "affine": spacing_affine(8.0, (32,) * 3).tolist()}, (32,) * 3
    )
    assert coarse["effusion"].shape == (32,) * 3 and coarse["lobes"].dtype == np.uint8
    assert coarse["effusion"].sum() * 8 == pytest.approx(same["effusion"].sum(), rel=0.25)
    assert set(np.unique(coarse["lobes"])) == set(range(6))
    with pytest.raises(DataError, match="no phantom truth.json"):
        bench.truth_file("phantom_0001", {}, phantom_cache["base"])


def test_script_writes_pointing_json_and_figure(phantom_cache, capsys):
    from medsyn.training.align import train_align
    from medsyn.training.config import load_run_config

    base = phantom_cache["base"]
    bert = make_text_model(base / "bert")
    run_dir = base / "align"
    train_align(load_run_config("align", None, align_overrides(phantom_cache["cache"], bert, run_dir,
                                                               **{"text.max_length": 256})))  # fmt: skip
    out = base / "out"
    bench.main(["pointing", "--align", str(run_dir), "--cache", str(phantom_cache["cache"]),
                "--phantoms", str(phantom_cache["phantoms"]), "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    report = json.loads((out / "pointing.json").read_text())
    assert json.loads(printed[-1]).keys() == report["words"].keys() == TARGETS.keys()
    assert report["split"] == "test" and report["subjects"] == 2
    for word in TARGETS:
        w = report["words"][word]
        assert w["cases"] >= 2, word
        for rule in ("overlap", "centre"):
            r = w[rule]
            assert r["accuracy"] == pytest.approx(r["hits"] / w["cases"]) and 0 <= r["baseline_all"] <= 1
            assert 0 <= r["p_body"] <= 1 and 0 <= r["baseline_body"] <= 1
    assert report["words"]["effusion"]["absent_mentions"] >= 0
    case = report["cases"][0]
    assert {"subject", "target", "word", "region", "patch", "hit", "chance_body", "chance_all"} <= case.keys()
    assert case["subject"] in {"phantom_0001", "phantom_0005"} and 0 <= case["patch"] < 64  # 4^3 patch tokens
    png = (out / "pointing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
