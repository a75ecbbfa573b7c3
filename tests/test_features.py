"""Feature extraction (random and loaded ResNets) and the FID / MMD distances on features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric
from safetensors.torch import save_file

from medsyn.errors import ConfigError
from medsyn.evaluation.features import (
    PLANES,
    _frechet_from_samples,
    build_feature_extractor,
    fid,
    fid_25d,
    load_resnet,
    metric_name,
    mmd,
    random_resnet,
)

TINY = {"input_size": 32, "slice_size": 32, "slices_per_plane": 3}


def _volume(seed: int, shape=(32, 32, 24)) -> np.ndarray:
    """A smooth random 'CT' in HU (body-like blobs in air)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(1, 1, 4, 4, 3)).astype(np.float32))
    x = torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    return np.clip(-400 + 600 * x, -1024, 1500).astype(np.int16)


@pytest.fixture(scope="module")
def extractor():
    return build_feature_extractor(**TINY)


def _save_medicalnet(net: torch.nn.Module, directory, name: str) -> tuple:
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    pth = directory / f"{name}.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, pth)
    st = directory / f"{name}.safetensors"
    save_file(state, str(st))
    return pth, st


def test_random_extractor_is_fixed_and_labelled(extractor):
    hu = _volume(0)
    torch.rand(10)  # the global RNG state must not matter
    again = build_feature_extractor(**TINY)
    f, g = extractor.features_3d(hu, 1.0), again.features_3d(hu, 1.0)
    assert f.shape == (512,) and f.dtype == np.float32
    np.testing.assert_array_equal(f, g)
    for plane, v in extractor.features_25d(hu, 1.0).items():
        np.testing.assert_array_equal(v, again.features_25d(hu, 1.0)[plane])
    other_seed = build_feature_extractor(seed=1, **TINY).features_3d(hu, 1.0)
    assert not np.allclose(f, other_seed)
    assert not extractor.trained_3d and not extractor.trained_2d
    assert "random" in extractor.label_3d and "random" in extractor.label_2d
    assert metric_name("FID", extractor.trained_3d) == "FID (random features)"
    assert metric_name("FID", True) == "FID"


def test_features_25d_shapes_and_content(extractor):
    out = extractor.features_25d(_volume(1), (1.0, 1.0, 1.5))
    assert set(out) == set(PLANES)
    assert all(v.shape == (3, 512) and v.dtype == np.float32 for v in out.values())
    assert not np.allclose(out["axial"], out["sagittal"])  # different planes, different slices


def test_loading_medicalnet_pth_and_safetensors_round_trips(extractor, tmp_path):
    pth, st = _save_medicalnet(extractor.net_3d, tmp_path, "resnet_10")
    hu = _volume(2)
    expected = extractor.features_3d(hu, 1.0)
    for path in (pth, st):
        loaded = build_feature_extractor(path=path, **TINY)
        assert loaded.trained_3d and not loaded.trained_2d
        assert loaded.label_3d.startswith("MedicalNet ResNet-10 from ") and str(path) in loaded.label_3d
        assert "sha256 " in loaded.label_3d
        np.testing.assert_allclose(loaded.features_3d(hu, 1.0), expected, rtol=1e-5, atol=1e-6)


def test_loading_infers_depth_and_shortcut_a(tmp_path):
    net, _ = random_resnet(3, seed=3, depth=18)  # MedicalNet ResNet-18: shortcut "A", no downsample conv
    pth, _ = _save_medicalnet(net, tmp_path, "weights")
    loaded, label = load_resnet(pth, 3)
    assert "ResNet-18" in label
    # MedicalNet geometry: layer3/layer4 keep layer2's resolution and dilate instead
    assert loaded.layer4[0].conv1.stride == (1, 1, 1) and loaded.layer4[1].conv2.dilation == (4, 4, 4)
    assert loaded.layer3[0].conv1.dilation == (2, 2, 2)
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net.eval()(x))
    net2d, _ = random_resnet(2, seed=0, depth=18)
    _, st = _save_medicalnet(net2d, tmp_path, "slices")
    assert build_feature_extractor(path_2d=st, **TINY).trained_2d


def test_bad_weight_files_name_the_file(extractor, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        build_feature_extractor(path=junk)
    with pytest.raises(ConfigError, match="not found"):
        build_feature_extractor(path=tmp_path / "absent.pth")
    state = extractor.net_3d.state_dict()
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, missing)
    with pytest.raises(ConfigError, match=r"missing\.pth: 1 missing keys"):
        build_feature_extractor(path=missing)
    unknown = tmp_path / "unknown.pth"
    torch.save({**state, "extra.weight": torch.zeros(1)}, unknown)
    with pytest.raises(ConfigError, match="unknown keys"):
        build_feature_extractor(path=unknown)
    misnamed = tmp_path / "resnet_50.pth"
    torch.save(state, misnamed)
    with pytest.raises(ConfigError, match="resnet_50.pth: the file name says ResNet-50"):
        build_feature_extractor(path=misnamed)


def test_fid_zero_for_identical_sets_and_grows_with_shift():
    rng = np.random.default_rng(0)
    for n, d in ((40, 8), (5, 64)):  # MONAI's FIDMetric path, and the few-samples path
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
        assert fid(a, a + 1.0) == pytest.approx(d * 1.0, rel=1e-6)  # a shift only moves the mean
        assert fid(a, b + 0.5) > fid(a, b + 0.1) > fid(a, a)
    with pytest.raises(ValueError, match="at least 2"):
        fid(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_few_samples_fid_matches_monai():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) * 1.5 + 0.2
    expected = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert _frechet_from_samples(a, b) == pytest.approx(expected, rel=1e-6)


def test_mmd_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 16)), rng.normal(size=(30, 16))  # different counts are fine
    same, shifted = mmd(a, b), mmd(a, b + 1.0)
    assert abs(same) < 0.02
    assert shifted > 0.1 and mmd(a, b + 2.0) > shifted
    with pytest.raises(ValueError, match="at least 2"):
        mmd(a[:1], b)


def test_fid_25d_per_plane_and_mean():
    rng = np.random.default_rng(3)
    vols = [{p: rng.normal(size=(3, 4)) for p in PLANES} for _ in range(4)]
    assert fid_25d(vols, vols) == pytest.approx(dict.fromkeys((*PLANES, "mean"), 0.0), abs=1e-6)
    moved = [{**v, "axial": v["axial"] + 1.0} for v in vols]
    out = fid_25d(vols, moved)
    assert out["axial"] == pytest.approx(4.0, rel=1e-6) and out["coronal"] == pytest.approx(0.0, abs=1e-6)
    assert out["mean"] == pytest.approx(4.0 / 3, rel=1e-6)
