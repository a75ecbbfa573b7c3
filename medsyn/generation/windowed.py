"""Sliding-window super-resolution: the SR denoiser evaluated window by window at every sampler step.

Why per step, not per window: running a whole sampler per window would let neighbouring windows
drift to different samples and leave seams. Here the sampler keeps one full-volume state x_t
(a few copies of (B, 4, *S): 0.25 GiB each at 256^3 in float32) and only the network sees windows:
each step's x0 estimate is stitched from windows on MONAI's grid (`dense_patch_slices`, the last window
aligned to the end) with Gaussian blending of overlapping windows, so the windows agree at every step.
The SR model is trained on crops, so windows near the crop size are also in its training distribution
(its GroupNorm statistics are per window). A window covering the volume is exactly one full forward.

Memory: one window (of every sample in the batch) is in the network at a time, and each window's x0 is
added into one preallocated (B, C, *S) sum in place and freed before the next; the low-resolution
condition is cut per window, never concatenated to x_t for the whole volume. Beyond the sampler's own
volumes a step needs that sum and the (*S) sum of weights (computed once): 0.31 GiB at 256^3, where
MONAI's `sliding_window_inference` held 0.81 GiB (the (B, C + C_c, *S) input concatenated for it, its
output and count map), besides the network's activations over one window instead of the whole volume
(`python benchmarks/sampling.py memory` measures both modes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from monai.data.utils import dense_patch_slices

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def window_size(window: int | Sequence[int], shape: Sequence[int], multiple: int = 1) -> tuple[int, ...]:
    """The window per axis: `window` clipped to the volume, and a multiple of the UNet's total
    downsampling factor (`multiple`) so every level has whole voxels."""
    sizes = [window] * len(shape) if isinstance(window, int) else list(window)
    if len(sizes) != len(shape):
        raise ValueError(f"window {window} has {len(sizes)} sizes for a {len(shape)}-D volume")
    out = []
    for w, s in zip(sizes, shape, strict=True):
        w = min(int(w), int(s))
        if w < multiple or (w % multiple and w != s):
            raise ValueError(
                f"window {w} must be a multiple of {multiple} (the UNet's downsampling) and at least that"
            )
        out.append(w)
    return tuple(out)


def unet_multiple(net: torch.nn.Module) -> int:
    """The product of a UNet's downsampling factors (largest per axis): window sizes must divide by it."""
    total = 1
    for factor in getattr(net, "downsample_factors", []):
        total *= max(factor) if isinstance(factor, Sequence) else int(factor)
    return total


# Floor of the blending weights, relative to their maximum of 1. A 3-D Gaussian window (sigma = side / 8) falls to
# ~4e-11 at its corners: 0 in float16 (smallest subnormal ~6e-8), so windows are always blended in float32 (see
# `windowed_denoiser`), where the weights are positive and the floor is a guard against underflow only. It must stay
# below the weight a neighbouring window gives the same voxel, because window edges see zero padding. Along the
# volume's faces with overlap 0.2 that weight is itself ~1e-8 (a window 2.25 sigma off centre on one axis, at its
# edge on two), so a floor of 1e-8 let corrupted edges make up half the blend there: errors up to 0.66 std of x0 at
# 256^3 by 144^3 windows with a local network (0.17 std in tests/test_windowed.py), against 0.016 std without a
# floor. The floor is therefore the smallest normal float32, which never binds in 3-D.
MIN_WEIGHT = torch.finfo(torch.float32).tiny


def gaussian_weights(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights of one window (*roi): a product of 1-D Gaussians (sigma = sigma_scale x side),
    maximum 1, floored at `MIN_WEIGHT` only so that every weight stays positive (MONAI's default map
    floors at 1e-3, which flattens the window's tails and weighs its corrupted edges up)."""
    axes = []
    for n in roi:
        r = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        axes.append(torch.exp(-0.5 * (r / (sigma_scale * n)) ** 2))
    weights = axes[0]
    for a in axes[1:]:
        weights = weights[..., None] * a
    return (weights / weights.max()).clamp(min=MIN_WEIGHT).float()


def window_slices(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows of size `roi` covering a volume of `shape`, as MONAI's sliding-window inference visits
    them: a step of int(roi x (1 - overlap)) per axis (at least 1), the last window aligned to the end."""
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, shape, strict=True)]
    return [
        tuple(slice(int(s.start), int(s.stop)) for s in w) for w in dense_patch_slices(shape, roi, interval)
    ]


def windowed_denoiser(
    denoiser: torch.nn.Module,
    cond: Mapping[str, torch.Tensor],
    window: int | Sequence[int],
    overlap: float = 0.25,
) -> DenoiseFn:
    """`denoise(x, t) -> x0` for the SR stage, evaluating `denoiser(x, t, concat=..., aug_t=...)` on
    windows of (x, concat), one window at a time, and blending them (Gaussian weights, `overlap` fraction
    between windows) so that the network's memory is bounded by the window, not the volume.

    cond: {"concat": (B, C_c, *S) noised upsampled low-resolution volume, "aug_t": (B,)}; denoise takes
    x (B, C, *S) and t (B,), both per sample like the full forward's.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    concat, aug_t = cond["concat"], cond["aug_t"]
    shape = tuple(concat.shape[2:])
    roi = window_size(window, shape, unet_multiple(denoiser.net))
    if roi == shape:  # one window: exactly the full-volume forward

        def full(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return denoiser(x, t, concat=concat.to(x.dtype), aug_t=aug_t).to(x.dtype)

        return full

    slices = window_slices(shape, roi, overlap)
    weights = gaussian_weights(roi).to(concat.device)  # (*roi)
    total = torch.zeros(shape, device=concat.device)  # (*S) the sum of the weights over windows, every step's
    for s in slices:
        total[s] += weights

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Blend in at least float32 whatever the state's dtype: in float16 the small weights at window edges
        # round to 0 (NaN or wrong edges).
        blend_dtype = torch.promote_types(x.dtype, torch.float32)
        out = torch.zeros(x.shape, dtype=blend_dtype, device=x.device)  # (B, C, *S) sum of weighted windows
        for s in slices:
            region = (slice(None), slice(None), *s)
            x0 = denoiser(x[region], t, concat=concat[region].to(x.dtype), aug_t=aug_t)  # (B, C, *roi)
            out[region].addcmul_(x0.to(blend_dtype), weights.to(blend_dtype))
            del x0  # the window's output goes before the next window's activations come
        return out.div_(total).to(x.dtype)

    return denoise
