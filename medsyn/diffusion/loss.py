"""Per-sample diffusion training loss (L2 in a parameterisation's target space).

One small class as in NVlabs/edm `loss.py`: it draws t and the noise, runs the denoiser once and
returns the unreduced loss (B,); the LightningModule reduces and logs. The paper trains x0-prediction
with an L2 loss on x0 (MedSyn, section III), which is the default here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medsyn.diffusion.denoiser import Denoiser, check_parameterization, from_x0
from medsyn.diffusion.schedule import append_dims

TIME_SAMPLINGS: tuple[str, ...] = ("uniform", "stratified", "logit-normal")


def sample_times(
    batch: int,
    kind: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times t (B,) in [0, 1): i.i.d. uniform, or "stratified" (low-discrepancy, VDM): one
    uniform offset u shared by the batch, t_i = (u + i / B) mod 1, which lowers the loss variance; or
    "logit-normal" (SD3's choice for rectified flow, Esser et al. 2024): t = sigmoid(n), n ~ N(0, 1),
    which trains the middle of the path most, drawn stratified too (n = probit of the stratified u)."""
    gen_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    elif kind in ("stratified", "logit-normal"):
        u = torch.rand((), generator=generator, device=gen_device, dtype=torch.float64)
        t = torch.remainder(u + torch.arange(batch, device=gen_device, dtype=torch.float64) / batch, 1.0)
        if kind == "logit-normal":
            t = torch.sigmoid(torch.special.ndtri(t.clamp(1e-12, 1.0 - 1e-12)))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; valid: {', '.join(TIME_SAMPLINGS)}")
    return t.to(device=device, dtype=torch.float32)


class DiffusionLoss:
    """L2 between the denoiser's prediction and its target, averaged over all non-batch dims.

    parameterization: the space the error is measured in ("x0", "eps" or "v"); None (default) uses
        the denoiser's own, so the raw network output is compared with its own target; with the
        default x0 denoiser that is the paper's x0 loss.
    channel_weights: optional C non-negative floats multiplying each channel's squared error (our
        channels ct, lobes, airway, vessels may deserve different weights); None weighs all by 1.
    time_sampling: "uniform" (i.i.d. t ~ U(0, 1)) or "stratified" over the batch.
    """

    def __init__(
        self,
        parameterization: str | None = None,
        channel_weights: Sequence[float] | None = None,
        time_sampling: str = "uniform",
    ) -> None:
        self.parameterization = None if parameterization is None else check_parameterization(parameterization)
        if channel_weights is not None:
            channel_weights = [float(w) for w in channel_weights]
            if not channel_weights or any(not w >= 0 for w in channel_weights):
                raise ValueError(f"channel_weights must be non-negative floats, got {channel_weights}")
        self.channel_weights = channel_weights
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        self.time_sampling = time_sampling

    def __call__(
        self,
        denoiser: Denoiser,
        x0: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Loss per sample (B,) for clean data x0 (B, C, ...); t (B,) and noise (like x0) drawn if None."""
        cond = dict(cond or {})
        batch = x0.shape[0]
        if t is None:
            t = sample_times(batch, self.time_sampling, generator, x0.device)
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(
                x0.device
            )
        x_t = denoiser.schedule.add_noise(x0, t, noise)  # (B, C, ...)
        out = denoiser.net_output(x_t, t, **cond)  # (B, C, ...) in the denoiser's parameterisation
        space = self.parameterization or denoiser.parameterization
        if space == denoiser.parameterization:
            pred = out
        else:
            alpha, sigma = denoiser.scales(t, x_t)
            pred = from_x0(denoiser.to_x0(out, x_t, t), x_t, alpha, sigma, space)
        target = denoiser.target(x0, noise, t, space)
        err = (pred.float() - target.float()).square()  # (B, C, ...)
        if self.channel_weights is not None:
            if len(self.channel_weights) != x0.shape[1]:
                raise ValueError(
                    f"channel_weights has {len(self.channel_weights)} entries but the data has {x0.shape[1]} channels"
                )
            w = torch.tensor(self.channel_weights, device=err.device, dtype=err.dtype)
            err = err * append_dims(w, err.ndim - 1)  # per-channel weight (C, 1, ..., 1)
        return err.flatten(1).mean(dim=1)  # (B,)
