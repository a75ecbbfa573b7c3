"""Noise schedules in continuous time t in [0, 1] and the time grids samplers walk.

Every schedule is a path x_t = alpha_t x0 + sigma_t eps from t = 0 (clean) to t = 1 (noise), with its
log signal-to-noise ratio logsnr(t) = log(alpha_t^2 / sigma_t^2) decreasing in t, and the time
derivatives of alpha and sigma (the velocity of the path, which the ODE samplers integrate). Notation
after Kingma et al., "Variational Diffusion Models" (2021).

- "cosine": variance preserving (alpha^2 + sigma^2 = 1), Nichol & Dhariwal (2021) in its continuous
  logSNR form, with the resolution shift of Hoogeboom et al., "simple diffusion" (2023); never exactly
  clean or pure noise (logsnr clipped to [-15, 15]).
- "rectified-flow": the straight path alpha = 1 - t, sigma = t (Liu et al., "Flow straight and fast",
  2022; Lipman et al., "Flow matching", 2022), pure noise at t = 1, with the time shift of Esser et al.
  (SD3, 2024). Its ODE is nearly straight, so few Euler/Heun steps suffice.
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
    default_grid: str  # the time grid samplers use unless told otherwise (see `time_grid`)

    def logsnr(self, t: torch.Tensor | float) -> torch.Tensor: ...

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def d_alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...


def _noised(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t noise; x0, noise (B, C, ...), t (B,)."""
    alpha, sigma = schedule.alpha_sigma(t.to(x0.device))
    alpha = append_dims(alpha.to(x0.dtype), x0.ndim)  # (B, 1, ..., 1)
    sigma = append_dims(sigma.to(x0.dtype), x0.ndim)
    return alpha * x0 + sigma * noise


def _out_dtype(t: torch.Tensor | float) -> torch.dtype:
    return t.dtype if isinstance(t, torch.Tensor) and t.is_floating_point() else torch.float64


class CosineSchedule:
    """Cosine schedule, logsnr(t) = -2 log tan(pi t / 2), reparametrised so it is finite at both ends.

    logsnr(t) = -2 log tan(a t + b) - 2 log(shift), with a, b chosen so that logsnr(0) = logsnr_max and
    logsnr(1) = logsnr_min when shift = 1. `shift` > 1 adds noise at every t (use resolution / base
    resolution when training at a larger size than the schedule was tuned for); shift = 1 is the plain
    cosine schedule of the paper.
    """

    name = "cosine"
    default_grid = "logsnr"

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
        alpha = torch.sigmoid(lam).sqrt()
        sigma = torch.sigmoid(-lam).sqrt()
        return alpha.to(_out_dtype(t)), sigma.to(_out_dtype(t))

    def d_alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Time derivatives (d alpha / dt, d sigma / dt), shaped and typed like `alpha_sigma`'s.

        With s = sigmoid(logsnr) = alpha^2: d alpha / d logsnr = alpha sigma^2 / 2, d sigma / d logsnr =
        -sigma alpha^2 / 2, and d logsnr / dt = -2 a / (sin u cos u) = -4 a / sin(2 u), u = a t + b."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        alpha, sigma = self.alpha_sigma(t64)
        dlam = -4.0 * self._a / torch.sin(2.0 * (self._a * t64 + self._b))
        d_alpha = 0.5 * alpha * sigma**2 * dlam
        d_sigma = -0.5 * sigma * alpha**2 * dlam
        return d_alpha.to(_out_dtype(t)), d_sigma.to(_out_dtype(t))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process sample x_t = alpha_t x0 + sigma_t noise; x0, noise (B, C, ...), t (B,)."""
        return _noised(self, x0, t, noise)


class RectifiedFlowSchedule:
    """The straight path x_t = (1 - tau) x0 + tau eps, tau = shift t / (1 + (shift - 1) t).

    shift = 1 is plain rectified flow (tau = t); shift > 1 spends more of [0, 1] at high noise (SD3's
    time shift), which lowers logsnr at every t by 2 log(shift), the same convention as the cosine
    schedule's shift. Pure noise at t = 1 (logsnr = -inf) and clean data at t = 0 (logsnr = +inf): use the
    uniform time grid, which with a shift is the shifted grid of SD3.
    """

    name = "rectified-flow"
    default_grid = "uniform"

    def __init__(self, shift: float = 1.0) -> None:
        if not shift > 0:
            raise ValueError(f"RectifiedFlowSchedule: shift must be positive, got {shift}")
        self.shift = float(shift)

    def __repr__(self) -> str:
        return f"RectifiedFlowSchedule(shift={self.shift})"

    def tau(self, t: torch.Tensor | float) -> torch.Tensor:
        """The noise scale sigma_t = tau(t) in float64 (shifted time)."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        return self.shift * t64 / (1.0 + (self.shift - 1.0) * t64)

    def logsnr(self, t: torch.Tensor | float) -> torch.Tensor:
        """2 log((1 - tau) / tau) in float64: +inf at t = 0, -inf at t = 1."""
        tau = self.tau(t)
        return 2.0 * (torch.log1p(-tau) - torch.log(tau))

    def t_from_logsnr(self, logsnr: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `logsnr` (float64): tau = sigmoid(-logsnr / 2), t = tau / (shift - (shift - 1) tau)."""
        tau = torch.sigmoid(-0.5 * torch.as_tensor(logsnr, dtype=torch.float64))
        return tau / (self.shift - (self.shift - 1.0) * tau)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - tau, tau), each shaped like t, in t's floating dtype (float64 for Python floats)."""
        tau = self.tau(t)
        return (1.0 - tau).to(_out_dtype(t)), tau.to(_out_dtype(t))

    def d_alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(-d tau / dt, d tau / dt) with d tau / dt = shift / (1 + (shift - 1) t)^2."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        d_tau = self.shift / (1.0 + (self.shift - 1.0) * t64) ** 2
        return (-d_tau).to(_out_dtype(t)), d_tau.to(_out_dtype(t))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process sample x_t = (1 - tau) x0 + tau noise; x0, noise (B, C, ...), t (B,)."""
        return _noised(self, x0, t, noise)


SCHEDULES: dict[str, type[CosineSchedule] | type[RectifiedFlowSchedule]] = {
    "cosine": CosineSchedule,
    "rectified-flow": RectifiedFlowSchedule,
}


def build_schedule(name: str, **kwargs: float) -> Schedule:
    """The schedule registered under `name` (config key `schedule`), built with `kwargs`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](**kwargs)


def time_grid(
    steps: int,
    kind: str | None = "uniform",
    schedule: Schedule | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Descending times from 1 to 0, steps + 1 points (steps + 1,), for the samplers.

    "uniform" is evenly spaced in t; "logsnr" is evenly spaced in the schedule's logSNR (needs
    `schedule`, with a finite logSNR at both ends), which spends more steps at the low- and high-noise
    ends; None: the schedule's own default grid (uniform without a schedule).
    """
    if kind is None:
        kind = schedule.default_grid if schedule is not None else "uniform"
    if int(steps) != steps or steps < 1:
        raise ValueError(f"time_grid: steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if kind == "uniform":
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    elif kind == "logsnr":
        if schedule is None:
            raise ValueError("time_grid: kind 'logsnr' needs the schedule")
        ends = float(schedule.logsnr(1.0)), float(schedule.logsnr(0.0))
        if not all(math.isfinite(v) for v in ends):
            raise ValueError(
                f"time_grid: the logsnr grid needs a finite logSNR at t = 0 and 1; the {schedule.name} schedule "
                "reaches clean data and pure noise there: use the uniform grid"
            )
        lam = torch.linspace(*ends, steps + 1, dtype=torch.float64)
        ts = schedule.t_from_logsnr(lam).clamp(0.0, 1.0)
        ts[0], ts[-1] = 1.0, 0.0
    else:
        raise ValueError(f"time_grid: unknown kind {kind!r}; valid kinds: {', '.join(TIME_GRIDS)}")
    return ts.to(dtype)
