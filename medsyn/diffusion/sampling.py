"""Samplers: a flat library of pure functions with one shared signature (k-diffusion style).

    sample_*(denoise, noise, ts, schedule, generators=None, callback=None, project=None,
             resample_rounds=0) -> x0 sample

denoise(x, t) -> x0 estimate, x (B, C, ...) and t (B,); `noise` is the state at ts[0] (usually t = 1);
`ts` a descending 1-D tensor of times (see `time_grid`), any number of steps. When the grid ends at
t = 0 the last step returns the denoised x0, so one step [1, 0] returns denoise(noise, 1).
`generators` holds one torch.Generator per sample: the fresh noise of sample i comes from generator i
only, so a sample does not depend on the batch it was drawn in. `callback(i, t, x, x0)` sees the state
before step i and its x0 estimate; `project(x, t) -> x` is applied to the state after every step
(e.g. to replace fixed channels by their forward-noised value, RePaint-style inpainting: see
`medsyn.diffusion.inpaint`), and `resample_rounds` re-noises and repeats each step that many times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from medsyn.diffusion.schedule import Schedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
ProjectFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def randn_per_sample(
    shape: Sequence[int],
    generators: Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape` (B, ...), row i drawn from generators[i] alone (or from the
    global generator when `generators` is None)."""
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} samples")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device=device)


def _check_grid(ts: torch.Tensor) -> list[float]:
    """The grid as Python floats, after checking it is 1-D, strictly decreasing and within [0, 1]."""
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D tensor of at least 2 times, got shape {tuple(ts.shape)}")
    times = [float(t) for t in ts.detach().cpu().double()]
    if any(s >= t for t, s in zip(times[:-1], times[1:], strict=True)):
        raise ValueError("ts must be strictly decreasing")
    if times[0] > 1.0 or times[-1] < 0.0:
        raise ValueError(f"ts must lie in [0, 1], got [{times[-1]}, {times[0]}]")
    return times


def _scales(schedule: Schedule, t: float) -> tuple[float, float, float]:
    """(alpha, sigma, logsnr) at a scalar time, in float64."""
    t64 = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t64)
    return float(alpha), float(sigma), float(schedule.logsnr(t64))


def _time(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)  # (B,)


def renoise(
    x_s: torch.Tensor, t: float, s: float, schedule: Schedule, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """A draw of q(x_t | x_s) for t > s: x_t = (alpha_t / alpha_s) x_s + sigma_{t|s} z (VDM notation)."""
    alpha_t, sigma_t = (float(v) for v in schedule.alpha_sigma(float(t)))
    alpha_s, sigma_s = (float(v) for v in schedule.alpha_sigma(float(s)))
    a = alpha_t / alpha_s
    std = math.sqrt(max(sigma_t**2 - a**2 * sigma_s**2, 0.0))
    return a * x_s + std * randn_per_sample(x_s.shape, generators, x_s.device, x_s.dtype)


# A sampler's step t -> s: step(x_t, x0_hat, t, s, history) -> (x_s, history). `history` is what a
# multistep solver carries from one step to the next (None for single-step samplers and at the start).
StepFn = Callable[[torch.Tensor, torch.Tensor, float, float, Any], tuple[torch.Tensor, Any]]


def _integrate(
    step: StepFn,
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None,
    callback: Callback | None,
    project: ProjectFn | None,
    resample_rounds: int = 0,
) -> torch.Tensor:
    """The loop every sampler shares: denoise at t, report, move to s with `step` (or return x0 when
    s = 0), then project. Samplers differ only in their step.

    resample_rounds: RePaint's resampling (Lugmayr et al., 2022): after a step t -> s (but the last),
    re-noise x_s to t and take the step again, `resample_rounds` times, so free channels settle in
    harmony with projected (fixed) ones. Every round starts from the history the step had before the
    first round, so a multistep solver stays a multistep solver. `callback` reports each step once.
    """
    if resample_rounds < 0:
        raise ValueError(f"resample_rounds must be >= 0, got {resample_rounds}")
    times = _check_grid(ts)
    x, history = noise, None
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        for r in range(resample_rounds + 1):
            x0 = denoise(x, _time(t, x))
            if callback is not None and r == 0:
                callback(i, _time(t, x), x, x0)
            x_s, after = (x0, history) if s <= 0.0 else step(x, x0, t, s, history)
            if project is not None:
                x_s = project(x_s, _time(s, x_s))
            if r == resample_rounds or s <= 0.0:
                break
            x = renoise(x_s, t, s, schedule, generators)
        x, history = x_s, after
    return x


@torch.no_grad()
def sample_ancestral(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    project: ProjectFn | None = None,
    resample_rounds: int = 0,
) -> torch.Tensor:
    """Ancestral (DDPM) sampling: draw x_s from the posterior q(x_s | x_t, x0 = x0_hat).

    In continuous time (VDM notation) alpha_{t|s} = alpha_t / alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2; the posterior has mean
    (alpha_{t|s} sigma_s^2 x_t + alpha_s sigma_{t|s}^2 x0_hat) / sigma_t^2 and variance
    sigma_{t|s}^2 sigma_s^2 / sigma_t^2. Stochastic: uses `generators` for the fresh noise.
    """

    def step(x: torch.Tensor, x0: torch.Tensor, t: float, s: float, history: Any) -> tuple[torch.Tensor, Any]:
        alpha_t, sigma_t, lam_t = _scales(schedule, t)
        alpha_s, sigma_s, lam_s = _scales(schedule, s)
        # sigma_{t|s}^2 / sigma_t^2 = 1 - SNR(t) / SNR(s), via expm1 for accuracy on small steps.
        c = -math.expm1(lam_t - lam_s)
        alpha_ts = alpha_t / alpha_s
        mean = (alpha_ts * sigma_s**2 / sigma_t**2) * x + (alpha_s * c) * x0
        std = sigma_s * math.sqrt(c)  # sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2)
        return mean + std * randn_per_sample(x.shape, generators, x.device, x.dtype), None

    return _integrate(step, denoise, noise, ts, schedule, generators, callback, project, resample_rounds)


@torch.no_grad()
def sample_ddim(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    project: ProjectFn | None = None,
    resample_rounds: int = 0,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al., 2021): x_s = alpha_s x0_hat + sigma_s eps_hat, deterministic for eta = 0
    (a first-order solver of the probability-flow ODE). eta = 1 matches ancestral sampling."""

    def step(x: torch.Tensor, x0: torch.Tensor, t: float, s: float, history: Any) -> tuple[torch.Tensor, Any]:
        alpha_t, sigma_t, lam_t = _scales(schedule, t)
        alpha_s, sigma_s, lam_s = _scales(schedule, s)
        eps = (x - alpha_t * x0) / sigma_t  # implied noise estimate
        std = eta * sigma_s * math.sqrt(-math.expm1(lam_t - lam_s))  # eta x posterior std
        x = alpha_s * x0 + math.sqrt(max(sigma_s**2 - std**2, 0.0)) * eps
        if std > 0.0:
            x = x + std * randn_per_sample(x.shape, generators, x.device, x.dtype)
        return x, None

    return _integrate(step, denoise, noise, ts, schedule, generators, callback, project, resample_rounds)


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    project: ProjectFn | None = None,
    resample_rounds: int = 0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022), the multistep second-order solver of the probability-flow
    ODE in data prediction, with lambda = log(alpha / sigma) and h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D, where D = x0_hat on the first step and
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev after it (r = h_prev / h). Deterministic; its history is
    (x0_prev, h_prev)."""

    def step(x: torch.Tensor, x0: torch.Tensor, t: float, s: float, history: Any) -> tuple[torch.Tensor, Any]:
        _, sigma_t, lam_t = _scales(schedule, t)
        alpha_s, sigma_s, lam_s = _scales(schedule, s)
        h = 0.5 * (lam_s - lam_t)  # lambda = logsnr / 2
        if history is None:
            d = x0
        else:
            x0_prev, h_prev = history
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        return (sigma_s / sigma_t) * x - (alpha_s * math.expm1(-h)) * d, (x0, h)

    return _integrate(step, denoise, noise, ts, schedule, generators, callback, project, resample_rounds)


def _velocity(schedule: Schedule, x: torch.Tensor, x0: torch.Tensor, t: float) -> torch.Tensor:
    """d x_t / dt of the probability-flow ODE along the schedule's path x_t = alpha_t x0 + sigma_t eps,
    with eps implied by the x0 estimate: alpha'_t x0 + sigma'_t (x - alpha_t x0) / sigma_t. For rectified
    flow that is (x - x0) / t, the straight line through x and x0."""
    t64 = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t64))
    d_alpha, d_sigma = (float(v) for v in schedule.d_alpha_sigma(t64))
    return d_alpha * x0 + (d_sigma / sigma) * (x - alpha * x0)


@torch.no_grad()
def sample_euler(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    project: ProjectFn | None = None,
    resample_rounds: int = 0,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in t: x_s = x_t + (s - t) dx/dt. On the rectified-flow
    path this is DDIM (x_s = (s / t) x_t + (1 - s / t) x0_hat); on a curved path (cosine) it is a plain
    first-order solver in t, worse than DDIM. Deterministic; one network evaluation per step."""

    def step(x: torch.Tensor, x0: torch.Tensor, t: float, s: float, history: Any) -> tuple[torch.Tensor, Any]:
        return x + (s - t) * _velocity(schedule, x, x0, t), None

    return _integrate(step, denoise, noise, ts, schedule, generators, callback, project, resample_rounds)


@torch.no_grad()
def sample_heun(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    project: ProjectFn | None = None,
    resample_rounds: int = 0,
) -> torch.Tensor:
    """Heun's method (explicit trapezoidal rule, Karras et al. 2022, algorithm 1) on the probability-flow
    ODE in t: an Euler step to s, the velocity there, and the step again with the mean of both velocities.
    Second order; two network evaluations per step except the last, which ends at t = 0 with x0_hat (so
    n steps cost 2n - 1 evaluations). `project` also applies to the Euler predictor before it is
    evaluated, so held channels are what the network sees at s."""

    def step(x: torch.Tensor, x0: torch.Tensor, t: float, s: float, history: Any) -> tuple[torch.Tensor, Any]:
        v = _velocity(schedule, x, x0, t)
        x_pred = x + (s - t) * v
        if project is not None:
            x_pred = project(x_pred, _time(s, x_pred))
        v_pred = _velocity(schedule, x_pred, denoise(x_pred, _time(s, x_pred)), s)
        return x + (s - t) * 0.5 * (v + v_pred), None

    return _integrate(step, denoise, noise, ts, schedule, generators, callback, project, resample_rounds)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}
# Network evaluations (per guidance branch) of one step, but the last, which returns x0_hat after one.
EVALS_PER_STEP: dict[str, int] = {"ancestral": 1, "ddim": 1, "dpmpp-2m": 1, "euler": 1, "heun": 2}


def network_evaluations(name: str, steps: int) -> int:
    """How many times sampler `name` calls the denoiser for a grid of `steps` steps ending at t = 0."""
    get_sampler(name)  # a ValueError naming the valid samplers for an unknown one
    return EVALS_PER_STEP[name] * (steps - 1) + 1


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler registered under `name`; a ValueError names the valid ones otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    name: str,
    denoise: DenoiseFn,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    project: ProjectFn | None = None,
    resample_rounds: int = 0,
    **options: float,
) -> torch.Tensor:
    """Run the sampler called `name` (one of `SAMPLERS`) with the shared signature;
    `options` go to that sampler only (e.g. eta for "ddim")."""
    return get_sampler(name)(
        denoise, noise, ts, schedule, generators=generators, callback=callback, project=project,
        resample_rounds=resample_rounds, **options,
    )  # fmt: skip
