"""Features of CT volumes (3D MedicalNet-style ResNet, 2.5D slice ResNet) and distances between sets of them.

The MedSyn paper reports FID and MMD on features of a MedicalNet 3D ResNet pretrained on medical volumes
(Chen et al. 2019, "Med3D"); the VLM3D text-to-CT challenge adds a 2.5D FID on 2D features of axial,
coronal and sagittal slices. Both networks are MONAI ResNets. Given no weights, each is a fixed randomly
initialised ResNet (seeded, identical on every machine): a weak but honest baseline whose scores must be
named as such, see `metric_name`.

Volumes are (i, j, k) arrays on a RAS grid in HU (as everywhere in medsyn): axial slices fix k, coronal j,
sagittal i.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric
from monai.networks import nets
from monai.networks.nets.resnet import ResNet, get_medicalnet_pretrained_resnet_args, resnet_params

from medsyn.errors import ConfigError

HU_RANGE = (-1024.0, 600.0)
PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
# heads that checkpoints may carry and a feature extractor does not use (MedicalNet's segmentation
# head, a classifier): dropped when loading
_HEADS = ("conv_seg.", "fc.")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def metric_name(kind: str, trained: bool) -> str:
    """`kind` ("FID", "MMD", "2.5D FID") as reported: scores on untrained features say so in their name."""
    return kind if trained else f"{kind} (random features)"


# ---------------------------------------------------------------- networks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a `.pth`/`.pt` torch file (loaded with weights_only, no code).

    Accepts MedicalNet checkpoints (`{"state_dict": {"module.conv1.weight": ...}}`) and plain state
    dicts; the `module.` prefix of DataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: never, for shared weights
        raise ConfigError(
            f"{path}: not a tensor-only weights file (it holds other Python objects or is no torch file); "
            "expected a MedicalNet .pth/.pt state dict or .safetensors"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{path}: cannot read weights ({type(e).__name__}: {first[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"{path}: expected a state dict of tensors (or {{'state_dict': ...}}), got {type(obj).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _layout(state: dict[str, torch.Tensor], path: Path) -> dict:
    """ResNet depth and shortcut layout read from the keys of a state dict."""
    try:
        layers = [
            1 + max(int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")) for i in range(1, 5)
        ]
        n_input_channels = int(state["conv1.weight"].shape[1])
    except (ValueError, KeyError):
        raise ConfigError(
            f"{path}: not a ResNet state dict (expected keys conv1.weight, layer1..layer4.*)"
        ) from None
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depth = next((int(n[6:]) for n, p in resnet_params.items() if (p[0], p[1]) == (block, layers)), None)
    if depth is None:
        raise ConfigError(
            f"{path}: a {block} ResNet with blocks {layers} is not one of ResNet-10/18/34/50/101/152/200"
        )
    named = re.search(r"resnet_?(\d+)", path.name.lower())
    if named and int(named.group(1)) != depth:
        raise ConfigError(
            f"{path}: the file name says ResNet-{named.group(1)} but its weights are ResNet-{depth}"
        )
    return {
        "depth": depth,
        "n_input_channels": n_input_channels,
        "shortcut_type": "B" if any(k.startswith("layer2.0.downsample.") for k in state) else "A",
        "bias_downsample": "layer2.0.downsample.0.bias" in state,
    }


def _medicalnet_strides(net: ResNet) -> ResNet:
    """Give a MONAI 3D ResNet MedicalNet's geometry: layer3 and layer4 keep the resolution of layer2 and
    dilate their 3x3x3 convolutions by 2 and 4 (MONAI strides them instead). Weights are unchanged."""
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            for m in block.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.stride = (1, 1, 1)
                    if m.kernel_size == (3, 3, 3):
                        m.dilation, m.padding = (dilation,) * 3, (dilation,) * 3
            if isinstance(block.downsample, functools.partial):  # shortcut "A": pooling with stride 1
                block.downsample = functools.partial(block.downsample, stride=1)
    return net


def _build_resnet(spatial_dims: int, depth: int, **kwargs) -> ResNet:
    # conv1: 7^d kernel with stride 2 in MedicalNet and torchvision alike; pooled features, no classifier
    return getattr(nets, f"resnet{depth}")(
        spatial_dims=spatial_dims, conv1_t_size=7, conv1_t_stride=2, feed_forward=False, **kwargs
    )


def load_resnet(path: str | os.PathLike, spatial_dims: int) -> tuple[ResNet, str]:
    """A MONAI ResNet with the weights in `path` (depth and layout from its keys) and a label for it.

    3D: MedicalNet layout (layer3/4 dilated). 2D: torchvision layout. Missing or unknown keys are a
    ConfigError naming the file.
    """
    path = Path(path)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(_HEADS)}
    layout = _layout(state, path)
    depth = layout.pop("depth")
    net = _build_resnet(spatial_dims, depth, **layout)
    if spatial_dims == 3:
        net = _medicalnet_strides(net)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(
            f"{path}: weights do not fit a ResNet-{depth} ({str(e).splitlines()[-1].strip()})"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    for problem, keys in (("missing", missing), ("unknown", result.unexpected_keys)):
        if keys:
            raise ConfigError(
                f"{path}: {len(keys)} {problem} keys for a ResNet-{depth}, e.g. {', '.join(keys[:3])}"
            )
    kind = "MedicalNet ResNet" if spatial_dims == 3 else "2D ResNet"
    return net, f"{kind}-{depth} from {path} (sha256 {_sha256(path)[:8]})"


def random_resnet(spatial_dims: int, seed: int = 0, depth: int = 10) -> tuple[ResNet, str]:
    """A randomly initialised ResNet, the same for a given seed on every machine, and a label for it."""
    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
    if spatial_dims == 2:  # torchvision layout
        bias_downsample, shortcut_type = False, "B"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _build_resnet(
            spatial_dims,
            depth,
            n_input_channels=1,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
        )
    if spatial_dims == 3:
        net = _medicalnet_strides(net)
    dims = "" if spatial_dims == 3 else " 2D"
    return (
        net,
        f"random{dims} ResNet-{depth}, seed {seed} (untrained: a weak baseline, not a trained feature space)",
    )


# ---------------------------------------------------------------- preprocessing


def resize_volume(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize (B, C, *spatial) to `shape`: area averaging along axes that shrink, then linear along any
    that grow (interpolation alone would alias the noise of a 512^3 CT)."""
    shrunk = tuple(min(s, t) for s, t in zip(x.shape[2:], shape, strict=True))
    if shrunk != tuple(x.shape[2:]):
        x = F.interpolate(x, size=shrunk, mode="area")
    if shrunk != tuple(shape):
        x = F.interpolate(
            x, size=tuple(shape), mode="trilinear" if len(shape) == 3 else "bilinear", align_corners=False
        )
    return x


def isotropic_cube(hu: np.ndarray, spacing_mm, size: int) -> torch.Tensor:
    """The CT clipped to HU_RANGE, resampled to `size`^3 with isotropic voxels (the longest physical
    extent fills the cube, the others are centred and padded with air).  # (1, 1, size, size, size)"""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    extent = np.asarray(hu.shape) * spacing
    shape = tuple(max(1, round(size * e / extent.max())) for e in extent)
    x = torch.from_numpy(np.clip(np.asarray(hu, dtype=np.float32), *HU_RANGE))[None, None]
    x = resize_volume(x, shape)
    pad = [p for s in reversed(shape) for p in ((size - s) // 2, size - s - (size - s) // 2)]
    return F.pad(x, pad, value=HU_RANGE[0])


# ---------------------------------------------------------------- the extractor


@dataclass
class FeatureExtractor:
    """3D features of a CT volume (`features_3d`) and 2D features of its slices (`features_25d`)."""

    net_3d: ResNet
    net_2d: ResNet
    label_3d: str
    label_2d: str
    trained_3d: bool
    trained_2d: bool
    input_size: int = 128  # the 3D network sees an isotropic input_size^3 cube
    slice_size: int = 128  # 2D slices are slice_size^2
    slices_per_plane: int = 16  # evenly spaced over the central half of each axis
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.net_3d.to(self.device).eval()
        self.net_2d.to(self.device).eval()

    @torch.no_grad()
    def features_3d(self, hu: np.ndarray, spacing_mm) -> np.ndarray:
        """Pooled 3D ResNet features of one CT, shape (D,), float32.

        MedicalNet preprocessing: resize to the input grid (here isotropic), then normalise by the mean
        and std of the voxels inside the field of view (above the clip floor, the CT analogue of
        MedicalNet's nonzero voxels). MedicalNet fills the background with random noise during training;
        we leave it, so features are deterministic.
        """
        x = isotropic_cube(hu, spacing_mm, self.input_size)  # (1, 1, S, S, S)
        inside = x > HU_RANGE[0]
        ref = x[inside] if inside.sum() > 1 else x.flatten()
        x = (x - ref.mean()) / ref.std().clamp_min(1e-6)
        return self.net_3d(x.to(self.device)).squeeze(0).float().cpu().numpy()

    @torch.no_grad()
    def features_25d(self, hu: np.ndarray, spacing_mm) -> dict[str, np.ndarray]:
        """2D ResNet features of `slices_per_plane` slices per plane: {plane: (n_slices, D2)}, float32.

        Slices come from an isotropic slice_size^3 resampling, windowed to HU_RANGE; a 3-channel network
        gets the slice replicated and ImageNet-normalised, a 1-channel one gets it scaled to [-1, 1].
        """
        cube = isotropic_cube(hu, spacing_mm, self.slice_size)[0, 0]  # (S, S, S)
        cube = (cube - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])  # [0, 1]
        s = self.slice_size
        index = torch.from_numpy(
            np.linspace(s / 4, 3 * s / 4 - 1, self.slices_per_plane).round().astype(np.int64)
        )
        slices = torch.cat(
            [cube.index_select(_PLANE_AXIS[p], index).movedim(_PLANE_AXIS[p], 0) for p in PLANES]
        )
        x = network_input_2d(slices[:, None], self.net_2d.conv1.in_channels)  # (3 n, C, S, S)
        feats = self.net_2d(x.to(self.device)).float().cpu().numpy()  # (3 n, D2)
        return dict(zip(PLANES, np.split(feats, len(PLANES)), strict=True))


def network_input_2d(images01: torch.Tensor, in_channels: int) -> torch.Tensor:
    """What a 2D feature network takes for images (N, 1, S, S) in [0, 1]: replicated to 3 channels and
    ImageNet-normalised for a 3-channel (ImageNet-trained) network, mapped to [-1, 1] for a 1-channel one."""
    if in_channels == 3:
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        return (images01.expand(-1, 3, -1, -1) - mean) / std
    return images01 * 2 - 1


def build_feature_extractor(
    path: str | os.PathLike | None = None,
    path_2d: str | os.PathLike | None = None,
    device: str = "cpu",
    seed: int = 0,
    input_size: int = 128,
    slice_size: int = 128,
    slices_per_plane: int = 16,
) -> FeatureExtractor:
    """A FeatureExtractor with MedicalNet weights from `path` and 2D ResNet weights (torchvision layout)
    from `path_2d`; either left out is a random ResNet (3D: ResNet-10, 2D: ResNet-18) seeded by `seed`."""
    for name, value in (
        ("input_size", input_size),
        ("slice_size", slice_size),
        ("slices_per_plane", slices_per_plane),
    ):
        if value < 1:
            raise ValueError(f"{name}={value}: expected a positive integer")
    net_3d, label_3d = load_resnet(path, 3) if path is not None else random_resnet(3, seed, depth=10)
    net_2d, label_2d = load_resnet(path_2d, 2) if path_2d is not None else random_resnet(2, seed, depth=18)
    return FeatureExtractor(
        net_3d=net_3d,
        net_2d=net_2d,
        label_3d=label_3d,
        label_2d=label_2d,
        trained_3d=path is not None,
        trained_2d=path_2d is not None,
        input_size=input_size,
        slice_size=slice_size,
        slices_per_plane=slices_per_plane,
        device=device,
    )


# ---------------------------------------------------------------- distances


def _check_sets(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{what}: expected two (n, d) feature matrices with the same d, got {a.shape} and {b.shape}"
        )
    if min(len(a), len(b)) < 2:
        raise ValueError(f"{what}: needs at least 2 volumes per set, got {len(a)} and {len(b)}")
    return a, b


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (n, d) and b (m, d).

    With more samples than dimensions, MONAI's FIDMetric (scipy sqrtm of the covariance product). With
    n <= d the covariances have rank < n and that sqrtm is ill-posed (negative scores, warnings, and d^3
    cost), so the same quantity is computed exactly from the data: tr sqrt(Sa Sb) is the nuclear norm of
    Bc Ac^T / sqrt((n-1)(m-1)) for the centred sets Ac, Bc. FID is biased upwards with few samples:
    compare only scores computed with the same numbers of volumes.
    """
    a, b = _check_sets(a, b, "fid")
    if min(len(a), len(b)) > a.shape[1]:
        with warnings.catch_warnings():  # MONAI passes scipy's deprecated sqrtm(disp=...)
            warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
            value = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    else:
        value = _frechet_from_samples(a, b)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _frechet_from_samples(a: np.ndarray, b: np.ndarray) -> float:
    """FID from the samples themselves, exact for any n, m >= 2 (see `fid`)."""
    n, m = len(a), len(b)
    ac, bc = a - a.mean(0), b - b.mean(0)
    tr_covmean = np.linalg.svd(bc @ ac.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ac**2).sum() / (n - 1) + (bc**2).sum() / (m - 1) - 2 * tr_covmean)


def mmd(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012) between feature
    sets a (n, d) and b (m, d), Gaussian kernel with the median pairwise distance of the pooled sets as
    bandwidth. Near 0 (possibly slightly negative) for sets from one distribution.

    Not MONAI's MMDMetric: it takes two image batches of the same shape (so n == m) and uses a linear
    kernel, which only compares the means.
    """
    a, b = _check_sets(a, b, "mmd")
    x = np.concatenate([a, b])
    sq = np.maximum((x**2).sum(1)[:, None] + (x**2).sum(1)[None] - 2 * x @ x.T, 0.0)
    off_diagonal = sq[~np.eye(len(x), dtype=bool)]
    bandwidth2 = np.median(off_diagonal) if np.median(off_diagonal) > 0 else max(off_diagonal.mean(), 1e-12)
    k = np.exp(-sq / (2 * bandwidth2))
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(
        (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
        + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        - 2 * kab.mean()
    )


def fid_25d(
    features_a: list[dict[str, np.ndarray]], features_b: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """2.5D FID: per plane, FID over all slices of all volumes (`features_25d` outputs); "mean" averages
    the three planes. This is how the VLM3D challenge forms its 2.5D FID, to the best of public
    descriptions (there with a 2D network of its own choosing)."""
    if not features_a or not features_b:
        raise ValueError(f"fid_25d: needs volumes in both sets, got {len(features_a)} and {len(features_b)}")
    out = {
        p: fid(np.concatenate([f[p] for f in features_a]), np.concatenate([f[p] for f in features_b]))
        for p in PLANES
    }
    out["mean"] = float(np.mean([out[p] for p in PLANES]))
    return out
