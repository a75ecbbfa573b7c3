"""Tests for medsyn.viz: shapes, radiological orientation, chosen planes, outlines, grid tiling, PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from medsyn.data.channels import encode_volume
from medsyn.data.phantom.dataset import generate_phantom
from medsyn.data.phantom.pathology import PathologyParams
from medsyn.viz import (
    AXIAL_LEVELS,
    LOBE_COLORS,
    _rgb,
    choose_slices,
    preview_grid,
    render_preview,
    render_volume,
    save_png,
)

N = 16


def _panels(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (r0, r1, c0, c1) of the white panels of a preview of an all-white CT, row by row."""
    white = (img > 250).all(-1)
    rows = np.flatnonzero(white.mean(1) > 0.3)
    cols = np.flatnonzero(white.mean(0) > 0.3)

    def runs(ix):
        cut = np.flatnonzero(np.diff(ix) > 1)
        return list(zip(ix[np.r_[0, cut + 1]], ix[np.r_[cut, len(ix) - 1]] + 1, strict=True))

    return [(r0, r1, c0, c1) for r0, r1 in runs(rows) for c0, c1 in runs(cols)]


def test_shape_dtype_and_deterministic_size():
    ct = np.random.default_rng(0).uniform(-1000, 500, (N, N, N))
    a = render_preview(ct, {"lobes": np.zeros((N, N, N), np.uint8)})
    b = render_preview(np.zeros((2 * N, N, N)), {"lobes": np.zeros((2 * N, N, N), np.uint8)})
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3
    assert a.shape == b.shape
    assert render_preview(ct).shape[0] < a.shape[0]  # one row without masks


def test_radiological_orientation():
    """A marker at the patient's left (low i in RAS), anterior, superior corner."""
    at = (2, N - 3, N - 3)
    white = render_preview(np.full((N, N, N), 600.0), {"airway": np.zeros((N, N, N))}, slices=at)
    boxes = _panels(white)
    assert len(boxes) == 6  # one axial level given: axial, coronal, sagittal in two rows
    ct = np.full((N, N, N), 600.0)
    ct[: N // 4, -N // 4 :, -N // 4 :] = -1024  # dark marker: left, anterior, superior
    img = render_preview(ct, {"airway": np.zeros((N, N, N))}, slices=at)
    dark = (img < 60).all(-1)
    # expected quadrants (top?, left?): axial top-right, coronal top-right, sagittal top-left
    for (r0, r1, c0, c1), (top, left) in zip(
        boxes[:3], [(True, False), (True, False), (True, True)], strict=True
    ):
        box = dark[r0:r1, c0:c1]
        rr, cc = np.nonzero(box)
        assert len(rr) > 0
        assert (rr.mean() < box.shape[0] / 2) == top
        assert (cc.mean() < box.shape[1] / 2) == left


def test_overlays_change_pixels_only_where_masks_are():
    ct = np.full((N, N, N), -200.0)
    empty = {"lobes": np.zeros((N, N, N), np.uint8), "vessels": np.zeros((N, N, N), np.uint8)}
    marked = {k: v.copy() for k, v in empty.items()}
    marked["vessels"][: N // 4, -N // 4 :, -N // 4 :] = 1
    at = (2, N - 3, N - 3)
    base, img = render_preview(ct, empty, slices=at), render_preview(ct, marked, slices=at)
    boxes = _panels(render_preview(np.full((N, N, N), 600.0), empty, slices=at))
    changed = (base != img).any(-1)
    assert changed.any()
    r0 = boxes[3][0]
    assert not changed[:r0].any()  # the CT row is untouched
    for (b0, b1, c0, c1), left in zip(boxes[3:], [False, False, True], strict=True):
        rr, cc = np.nonzero(changed[b0:b1, c0:c1])
        assert rr.max() < (b1 - b0) / 2 + 2
        assert (cc < (c1 - c0) / 2).all() == left


@pytest.fixture(scope="module")
def effusion():
    """A phantom with a large right pleural effusion, and the fluid: lung of the same body without it."""
    sick = generate_phantom(size=64, seed=3, params=PathologyParams(effusion="large", effusion_side="right"))
    healthy = generate_phantom(size=64, seed=3, params=PathologyParams(effusion="none"))
    return sick, (healthy.lobes > 0) & (sick.lobes == 0)


@pytest.mark.parametrize("with_masks", [True, False])
def test_axial_levels_show_the_effusion(effusion, with_masks):
    sick, fluid = effusion
    masks = (sick.lobes, sick.vessels) if with_masks else ()
    i, j, ks = choose_slices(sick.ct, *masks)
    area = fluid.sum((0, 1))  # (K,) fluid voxels per axial level
    assert len(ks) == 3 and ks[0] > ks[1] > ks[2]  # superior first
    assert area[ks[2]] >= 0.8 * area.max() > 0  # the lower level is at the effusion's bulk
    assert area[sick.ct.shape[2] // 2] < 0.6 * area.max()  # which the middle level is not
    at_fluid = fluid[..., ks[2]] & (sick.ct[..., ks[2]] > -20) & (sick.ct[..., ks[2]] < 60)
    assert at_fluid[sick.ct.shape[0] // 2 :].sum() > 50  # fluid-density voxels in the right hemithorax
    assert (sick.lobes[i] >= 3).any() and not (sick.lobes[i] == 1).any()  # sagittal: the right lung
    assert (sick.lobes[:, j] > 0).sum() > 0.5 * (sick.lobes > 0).sum((0, 2)).max()  # coronal: through both


def test_render_uses_chosen_slices_and_explicit_slices_win(effusion):
    sick, _ = effusion
    masks = {"lobes": sick.lobes, "airway": sick.airway, "vessels": sick.vessels}
    at = choose_slices(sick.ct, sick.lobes, sick.vessels)
    img = render_preview(sick.ct, masks, spacing=sick.affine)
    np.testing.assert_array_equal(img, render_preview(sick.ct, masks, spacing=sick.affine, slices=at))
    np.testing.assert_array_equal(img, render_volume(encode_volume({"ct": sick.ct, **masks}), sick.affine))
    two = render_preview(sick.ct, masks, slices=(None, None, (40, 20)))
    assert (
        len(_panels(render_preview(np.full((64,) * 3, 600.0), {"a": sick.airway}, slices=(0, 0, (40, 20)))))
        == 8
    )
    assert two.shape[0] == img.shape[0] and two.shape[1] < img.shape[1]
    with pytest.raises(ValueError, match="out of range"):
        render_preview(sick.ct, slices=(None, None, 64))


def test_no_lungs_falls_back_to_fractions_of_the_volume():
    i, j, ks = choose_slices(np.full((N, N, 2 * N), 40.0))
    assert (i, j) == (N // 2, N // 2)
    assert ks == tuple(round(f * (2 * N - 1)) for f in AXIAL_LEVELS)


def test_outlines_leave_the_ct_readable(effusion):
    """Overlay panels change few pixels (thin outlines, no fill), though the lungs fill much of them."""
    sick, _ = effusion
    masks = {"lobes": sick.lobes, "airway": sick.airway, "vessels": sick.vessels}
    img = render_preview(sick.ct, masks)
    at = choose_slices(sick.ct, sick.lobes, sick.vessels)
    boxes = _panels(render_preview(np.full(sick.ct.shape, 600.0), {"a": sick.airway}, slices=at))
    assert len(boxes) == 10
    for (r0, r1, c0, c1), (s0, s1, d0, d1) in zip(boxes[:5], boxes[5:], strict=True):
        ct, overlay = img[r0:r1, c0:c1], img[s0:s1, d0:d1]
        lungs = ((ct > 5) & (ct < 60)).all(-1).mean()  # lung parenchyma is dark grey in the full window
        changed = (ct != overlay).any(-1).mean()
        assert 0.002 < changed < min(0.1, 0.5 * lungs), (changed, lungs)


def test_lobe_colours_distinct():
    cols = np.stack([_rgb(c) for c in LOBE_COLORS.values()])
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[~np.eye(len(cols), dtype=bool)].min() > 0.25


def test_grid_tiling_and_captions():
    ims = [
        np.zeros((40, 60, 3), np.uint8),
        np.full((30, 50, 3), 255, np.uint8),
        np.zeros((40, 60, 3), np.uint8),
    ]
    assert preview_grid(ims, ncols=2).shape == (80, 120, 3)
    g = preview_grid(ims, ["a very long prompt " * 10, "b", "c"], ncols=3)
    assert g.shape[1] == 180 and g.shape[0] > 40
    assert g[-40:-10, 60:110].mean() > 250  # the white tile: second column, top aligned


def test_torch_input_and_render_volume():
    vols = {"ct": np.full((N, N, N), -500.0), "lobes": np.ones((N, N, N)), "airway": np.zeros((N, N, N)),
            "vessels": np.zeros((N, N, N))}  # fmt: skip
    x = torch.from_numpy(encode_volume(vols))
    a = render_volume(x, spacing=(1.0, 1.0, 2.0))
    b = render_preview(torch.from_numpy(vols["ct"]), {k: vols[k] for k in ("lobes", "airway", "vessels")},
                       spacing=(1.0, 1.0, 2.0))  # fmt: skip
    np.testing.assert_array_equal(a, b)


def test_save_png(tmp_path):
    img = render_preview(np.zeros((N, N, N)))
    save_png(tmp_path / "p.png", img)
    back = imread(tmp_path / "p.png")
    assert back.shape[:2] == img.shape[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


@pytest.mark.parametrize("shape", [(N, N), (3, N, N, N)])
def test_bad_input_names_shape(shape):
    with pytest.raises(ValueError, match=str(shape[0])):
        (render_volume if len(shape) == 4 else render_preview)(np.zeros(shape))
