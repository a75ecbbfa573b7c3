"""Sliding-window super-resolution: the SR denoiser evaluated window by window at every sampler step.

Why per step, not per window: running a whole sampler per window would let neighbouring windows
drift to different samples and leave seams. Here the sampler keeps one full-volume state x_t
(a few copies of (B, 4, *S): about 0.3 GB each at 256^3) and only the network sees windows: each step's
x0 estimate is stitched by MONAI's `sliding_window_inference` with Gaussian blending of overlapping
windows, so the windows agree at every step and network activations stay bounded by the window size.
The SR model is trained on crops, so windows near the crop size are also in its training distribution
(its GroupNorm statistics are per window). A window covering the volume is exactly one full forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from monai.inferers import sliding_window_inference

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
# far below the weight a neighbouring window gives the same voxel, because window edges see zero padding: at small
# windows (8^3, overlap 0.5) two-axis edges weigh ~5e-6, and a floor of 1e-6 or more let corrupted corners shift
# the blend by up to 0.05 (measured in tests/test_pipeline.py); 1e-8 leaves it as without a floor.
MIN_WEIGHT = 1e-8


def gaussian_weights(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights of one window (*roi): a product of 1-D Gaussians (sigma = sigma_scale x side),
    maximum 1, floored at `MIN_WEIGHT` so every weight stays positive (MONAI's default map
    floors at 1e-3 instead, ten times higher, which flattens more of each window's tails)."""
    axes = []
    for n in roi:
        r = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        axes.append(torch.exp(-0.5 * (r / (sigma_scale * n)) ** 2))
    weights = axes[0]
    for a in axes[1:]:
        weights = weights[..., None] * a
    return (weights / weights.max()).clamp(min=MIN_WEIGHT).float()


def windowed_denoiser(
    denoiser: torch.nn.Module,
    cond: Mapping[str, torch.Tensor],
    window: int | Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> DenoiseFn:
    """`denoise(x, t) -> x0` for the SR stage, evaluating `denoiser(x, t, concat=..., aug_t=...)` on
    windows of (x, concat) and blending them (Gaussian weights, `overlap` fraction between windows).

    cond: {"concat": (B, C_c, *S) noised upsampled low-resolution volume, "aug_t": (B,)}.
    The samplers call denoise with one time for the whole batch; windows are per sample.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    concat, aug_t = cond["concat"], cond["aug_t"]
    channels = denoiser.net.out_channels
    roi = window_size(window, concat.shape[2:], unet_multiple(denoiser.net))
    weights = gaussian_weights(roi).to(concat.device)  # (*roi)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not bool((t == t[0]).all()) or not bool((aug_t == aug_t[0]).all()):
            raise ValueError("windowed_denoiser: expected one time and one aug_t for the whole batch")
        # Blend in at least float32 whatever the state's dtype: MONAI accumulates windows and weights in the
        # inputs' dtype, and in float16 the small weights at window edges round to 0 (NaN or wrong edges).
        blend_dtype = torch.promote_types(x.dtype, torch.float32)
        inputs = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C + C_c, *S)

        def predictor(patch: torch.Tensor) -> torch.Tensor:  # (n, C + C_c, *roi) -> (n, C, *roi)
            n = patch.shape[0]
            patch = patch.to(x.dtype)  # the network sees the state's dtype (exact: inputs came from it)
            out = denoiser(
                patch[:, :channels], t[:1].expand(n), concat=patch[:, channels:], aug_t=aug_t[:1].expand(n)
            )
            return out.to(blend_dtype)

        if tuple(roi) == tuple(x.shape[2:]):  # one window: exactly the full-volume forward
            return predictor(inputs).to(x.dtype)
        out = sliding_window_inference(
            inputs.to(blend_dtype),
            roi,
            sw_batch_size,
            predictor,
            overlap=overlap,
            roi_weight_map=weights.to(blend_dtype),
        )  # (B, C, *S) in blend_dtype
        return out.to(x.dtype)

    return denoise
