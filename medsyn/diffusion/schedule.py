"""Noise schedules in continuous time t in [0, 1] and the time grids samplers walk.

Variance preserving: x_t = alpha_t x0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1, so a schedule is
fully described by its log signal-to-noise ratio logsnr(t) = log(alpha_t^2 / sigma_t^2), decreasing
from t = 0 (almost clean) to t = 1 (almost pure noise). Notation after Kingma et al., "Variational
Diffusion Models" (2021); the cosine schedule is Nichol & Dhariwal (2021) in its continuous logSNR form,
with the resolution shift of Hoogeboom et al., "simple diffusion" (2023).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

TIME_GRIDS: tuple[str, ...] = ("uniform", "logsnr")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to `x` until it has `ndim` dims, so a (B,) tensor broadcasts
    against (B, C, ...) data of any rank (2-D images, 3-D volumes) without a hard-coded reshape."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than the target {ndim}")
    return x[(...,) + (None,) * missing]


class Schedule(Protocol):
    """What the denoiser, loss and samplers need from a schedule (so other schedules can plug in)."""

    name: str

    def logsnr(self, t: torch.Tensor | float) -> torch.Tensor: ...

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...


class CosineSchedule:
    """Cosine schedule, logsnr(t) = -2 log tan(pi t / 2), reparametrised so it is finite at both ends.

    logsnr(t) = -2 log tan(a t + b) - 2 log(shift), with a, b chosen so that logsnr(0) = logsnr_max and
    logsnr(1) = logsnr_min when shift = 1. `shift` > 1 adds noise at every t (use resolution / base
    resolution when training at a larger size than the schedule was tuned for); shift = 1 is the plain
    cosine schedule of the paper.
    """

    name = "cosine"

    def __init__(self, logsnr_min: float = -15.0, logsnr_max: float = 15.0, shift: float = 1.0) -> None:
        if not logsnr_min < logsnr_max:
            raise ValueError(
                f"CosineSchedule: logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max})"
            )
        if not shift > 0:
            raise ValueError(f"CosineSchedule: shift must be positive, got {shift}")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.shift = float(shift)
        self._b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self._a = math.atan(math.exp(-0.5 * self.logsnr_min)) - self._b
        self._offset = 2.0 * math.log(self.shift)

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max}, shift={self.shift})"
        )

    def logsnr(self, t: torch.Tensor | float) -> torch.Tensor:
        """log(alpha^2 / sigma^2) at time t (any shape), computed in float64 for accuracy near the ends."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        return -2.0 * torch.log(torch.tan(self._a * t64 + self._b)) - self._offset

    def t_from_logsnr(self, logsnr: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `logsnr`: the time at which the schedule reaches the given logSNR (float64)."""
        lam = torch.as_tensor(logsnr, dtype=torch.float64) + self._offset
        return (torch.atan(torch.exp(-0.5 * lam)) - self._b) / self._a

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise scales (alpha_t, sigma_t), each shaped like t, with alpha^2 + sigma^2 = 1.

        Returned in t's floating dtype (float64 for Python floats)."""
        lam = self.logsnr(t)
        dtype = t.dtype if isinstance(t, torch.Tensor) and t.is_floating_point() else torch.float64
        alpha = torch.sigmoid(lam).sqrt()
        sigma = torch.sigmoid(-lam).sqrt()
        return alpha.to(dtype), sigma.to(dtype)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process sample x_t = alpha_t x0 + sigma_t noise; x0, noise (B, C, ...), t (B,)."""
        alpha, sigma = self.alpha_sigma(t.to(x0.device))
        alpha = append_dims(alpha.to(x0.dtype), x0.ndim)  # (B, 1, ..., 1)
        sigma = append_dims(sigma.to(x0.dtype), x0.ndim)
        return alpha * x0 + sigma * noise


SCHEDULES: dict[str, type[CosineSchedule]] = {"cosine": CosineSchedule}


def build_schedule(name: str, **kwargs: float) -> CosineSchedule:
    """The schedule registered under `name` (config key `schedule`), built with `kwargs`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](**kwargs)


def time_grid(
    steps: int,
    kind: str = "uniform",
    schedule: CosineSchedule | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Descending times from 1 to 0, steps + 1 points (steps + 1,), for the samplers.

    "uniform" is evenly spaced in t; "logsnr" is evenly spaced in the schedule's logSNR (needs
    `schedule`), which spends more steps at the low- and high-noise ends.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"time_grid: steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if kind == "uniform":
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    elif kind == "logsnr":
        if schedule is None:
            raise ValueError("time_grid: kind 'logsnr' needs the schedule")
        lam = torch.linspace(
            float(schedule.logsnr(1.0)), float(schedule.logsnr(0.0)), steps + 1, dtype=torch.float64
        )
        ts = schedule.t_from_logsnr(lam).clamp(0.0, 1.0)
        ts[0], ts[-1] = 1.0, 0.0
    else:
        raise ValueError(f"time_grid: unknown kind {kind!r}; valid kinds: {', '.join(TIME_GRIDS)}")
    return ts.to(dtype)
