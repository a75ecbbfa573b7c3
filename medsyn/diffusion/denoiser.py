"""The one interface between a network and the diffusion process: `denoise(x_t, t, **cond) -> x0`.

The network knows nothing about the schedule: it sees the noisy input and t in [0, 1] and predicts x0,
eps, v (Salimans & Ho, "Progressive Distillation", 2022) or the flow velocity eps - x0 (the rectified
flow's d x_t / dt, Liu et al. 2022; defined and invertible for any schedule). `Denoiser` turns that prediction into x0
for samplers, and gives the loss the raw prediction and its regression target.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medsyn.diffusion.schedule import Schedule, append_dims, build_schedule

PARAMETERIZATIONS: tuple[str, ...] = ("x0", "eps", "v", "flow")


def check_parameterization(name: str) -> str:
    """Return `name` if it is a known parameterisation, else raise a ValueError naming the valid ones."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {name!r}; valid parameterizations: {', '.join(PARAMETERIZATIONS)}"
        )
    return name


def target_from(
    x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parameterization: str
) -> torch.Tensor:
    """The quantity a `parameterization` predicts, given x0 and the noise; alpha, sigma broadcastable."""
    if check_parameterization(parameterization) == "x0":
        return x0
    if parameterization == "eps":
        return noise
    if parameterization == "flow":
        return noise - x0
    return alpha * noise - sigma * x0  # v


def x0_from(
    out: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    parameterization: str,
    alpha_min: float = 1e-4,
) -> torch.Tensor:
    """Invert `target_from`: x0 from a prediction `out` of the given parameterisation at x_t."""
    if check_parameterization(parameterization) == "x0":
        return out
    if parameterization == "eps":
        return (x_t - sigma * out) / alpha.clamp(min=alpha_min)
    if parameterization == "flow":  # x_t = alpha x0 + sigma (out + x0)
        return (x_t - sigma * out) / (alpha + sigma)
    return (alpha * x_t - sigma * out) / (
        alpha**2 + sigma**2
    )  # v; the denominator is 1 when variance preserving


def from_x0(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    parameterization: str,
    sigma_min: float = 1e-4,
) -> torch.Tensor:
    """Express an x0 estimate at x_t in another parameterisation (eps = (x_t - alpha x0) / sigma)."""
    if check_parameterization(parameterization) == "x0":
        return x0
    eps = (x_t - alpha * x0) / sigma.clamp(min=sigma_min)
    return target_from(x0, eps, alpha, sigma, parameterization)


class Denoiser(nn.Module):
    """Wrap a network predicting x0, eps, v or flow into an x0-denoiser.

    `net(x_t, t, **cond)` takes x_t (B, C, ...) and t (B,) in [0, 1] and returns a tensor shaped
    like x_t. `alpha_min` bounds the division by alpha in the eps parameterisation near t = 1.
    """

    def __init__(
        self, net: nn.Module, schedule: Schedule, parameterization: str = "x0", alpha_min: float = 1e-4
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.alpha_min = float(alpha_min)

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization!r}, schedule={self.schedule!r}"

    def scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) for t (B,), broadcast to `like`'s rank and cast to its dtype and device."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha = append_dims(alpha.to(device=like.device, dtype=like.dtype), like.ndim)  # (B, 1, ..., 1)
        sigma = append_dims(sigma.to(device=like.device, dtype=like.dtype), like.ndim)
        return alpha, sigma

    def net_output(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The network's raw prediction (in its parameterisation) at x_t (B, C, ...), t (B,)."""
        return self.net(x_t, t, **cond)

    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a raw prediction `out` at (x_t, t) to x0."""
        alpha, sigma = self.scales(t, x_t)
        return x0_from(out, x_t, alpha, sigma, self.parameterization, self.alpha_min)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """x0 estimate (B, C, ...) from x_t (B, C, ...) at times t (B,) given conditions `cond`."""
        return self.to_x0(self.net_output(x_t, t, **cond), x_t, t)

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, parameterization: str | None = None
    ) -> torch.Tensor:
        """Regression target of x_t = alpha_t x0 + sigma_t noise in `parameterization` (default: own)."""
        alpha, sigma = self.scales(t, x0)
        return target_from(x0, noise, alpha, sigma, parameterization or self.parameterization)


def build_denoiser(
    net: nn.Module, schedule: str = "cosine", schedule_shift: float = 1.0, parameterization: str = "x0"
) -> Denoiser:
    """A denoiser around `net` from a run config's `diffusion` section (its keys are these arguments)."""
    return Denoiser(net, build_schedule(schedule, shift=schedule_shift), parameterization)
