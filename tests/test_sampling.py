"""Tests for medsyn.diffusion.sampling: the samplers are proved right on Gaussian data, where the exact
x0-denoiser is closed form, and checked for their contract (one step, generators, hooks, errors)."""

from __future__ import annotations

import math

import pytest
import torch

from medsyn.diffusion.sampling import (
    SAMPLERS,
    get_sampler,
    randn_per_sample,
    sample,
    sample_ancestral,
    sample_ddim,
)
from medsyn.diffusion.schedule import CosineSchedule, append_dims, time_grid

SCHED = CosineSchedule()
# Per-channel data distribution N(MU, S^2): four channels like ct, lobes, airway, vessels.
MU = torch.tensor([0.5, -0.3, 1.0, 0.0])
S = torch.tensor([0.1, 0.5, 1.0, 1.5])
SHAPE = (4, 8, 8, 8)  # (C, D, H, W)


def gaussian_denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_t] for x0 ~ N(MU, S^2) per channel: MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha MU)."""
    alpha, sigma = SCHED.alpha_sigma(t)
    alpha, sigma = (
        append_dims(alpha.to(x.dtype), x.ndim),
        append_dims(sigma.to(x.dtype), x.ndim),
    )  # (B, 1, ...)
    mu, var = (
        append_dims(MU.to(x.dtype), x.ndim - 1),
        append_dims(S.to(x.dtype) ** 2, x.ndim - 1),
    )  # (C, 1, ...)
    return mu + alpha * var / (alpha**2 * var + sigma**2) * (x - alpha * mu)


def reference_moments(name: str, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance (C,) of what sampler `name` outputs on the Gaussian data, in float64.

    Written independently of the implementation, in the discrete alpha-bar notation of the original
    papers. Every step is affine in the state, so the state is x = A z + B + e with z ~ N(0, 1) the
    initial noise and e independent injected noise of variance V, per channel."""
    mu, var = MU.double(), S.double() ** 2
    A, B, V = (
        torch.ones(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
    )
    times = [float(t) for t in ts.double()]
    prev = None  # DPM-Solver++: (A, B) of the previous x0 estimate and the previous step size
    for t, s in zip(times[:-1], times[1:], strict=True):
        ab_t = float(torch.sigmoid(SCHED.logsnr(t)))
        K = math.sqrt(ab_t) * var / (ab_t * var + 1 - ab_t)  # x0_hat = mu + K (x - sqrt(ab_t) mu)
        xA, xB = K * A, mu + K * (B - math.sqrt(ab_t) * mu)
        if s <= 0:
            A, B, V = xA, xB, K * K * V
            continue
        ab_s = float(torch.sigmoid(SCHED.logsnr(s)))
        if name == "ancestral":  # Ho et al. 2020, eq. 6-7
            beta = 1 - ab_t / ab_s
            c_x0 = math.sqrt(ab_s) * beta / (1 - ab_t)
            c_xt = math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
            M = c_xt + c_x0 * K
            A, B, V = M * A, c_xt * B + c_x0 * xB, M * M * V + (1 - ab_s) / (1 - ab_t) * beta
        elif name == "ddim":  # Song et al. 2021, eq. 12 with eta = 0
            r = math.sqrt((1 - ab_s) / (1 - ab_t))
            c = math.sqrt(ab_s) - r * math.sqrt(ab_t)
            A, B = r * A + c * xA, r * B + c * xB
        else:  # DPM-Solver++(2M), Lu et al. 2022, algorithm 2
            h = 0.5 * math.log(ab_s / (1 - ab_s)) - 0.5 * math.log(ab_t / (1 - ab_t))
            DA, DB = xA, xB
            if prev is not None:
                (pA, pB), h_prev = prev
                k = h / (2 * h_prev)
                DA, DB = (1 + k) * xA - k * pA, (1 + k) * xB - k * pB
            r, c = math.sqrt((1 - ab_s) / (1 - ab_t)), -math.sqrt(ab_s) * math.expm1(-h)
            A, B = r * A + c * DA, r * B + c * DB
            prev = ((xA, xB), h)
    return B, A * A + V


def test_reference_chains_converge_to_the_data_distribution():
    # The reference is only worth comparing against if it is the right algorithm: with many steps every
    # chain must reproduce the data. Measured at 2000 logSNR steps (first-order ancestral/DDIM converge as
    # 1/steps): variance error ancestral -0.75%, ddim -0.37%, dpmpp-2m < 0.01%; mean error <= 6e-4
    # (the t = 1 marginal has mean alpha_1 MU = 5.5e-4 MU, not 0).
    ts = time_grid(2000, "logsnr", SCHED, dtype=torch.float64)
    for name in CHAIN_SAMPLERS:
        mean, var = reference_moments(name, ts)
        torch.testing.assert_close(mean, MU.double(), atol=1e-3, rtol=0)
        torch.testing.assert_close(var, S.double() ** 2, atol=0, rtol=0.01)


# Variance error of the samplers against the DATA, relative, measured (exact discretised chains, which the
# Monte-Carlo runs below reproduce) for channels with S = 0.1, 0.5, 1.0, 1.5:
#   logsnr grid, 10 steps:  ancestral -69 %, ddim -53 %, dpmpp-2m -1 % .. +8 %
#   logsnr grid, 100 steps: ancestral -13.6 %, ddim -7.2 %, dpmpp-2m +0.3 %
#   uniform grid, 10 steps: ancestral -76 .. -31 %, ddim -74 .. -22 %, dpmpp-2m -72 .. -4 % (the last
#   step from t = 0.1 cannot resolve the S = 0.1 channel)
# That is the discretisation error of the algorithms (first-order ancestral/DDIM shrink the variance),
# not Monte-Carlo noise; the tolerances below sit just above it. What proves each implementation right at
# few steps is the tight comparison with the exact chain moments. Checked by mutating the samplers: a
# missing sqrt on the ancestral std, the beta (not posterior) variance, a missing square in the posterior
# mean, a wrong DDIM coefficient, lambda = logsnr instead of logsnr / 2, a flipped or dropped DPM-Solver++
# correction all fail every case; an inverted r = h / h_prev fails the uniform grid (r = 1 on the logSNR
# grid), which is why that grid is tested too.
DATA_VAR_TOL = {
    ("ancestral", 10, "logsnr"): 0.75,
    ("ddim", 10, "logsnr"): 0.6,
    ("dpmpp-2m", 10, "logsnr"): 0.1,
    ("ancestral", 100, "logsnr"): 0.16,
    ("ddim", 100, "logsnr"): 0.09,
    ("dpmpp-2m", 100, "logsnr"): 0.01,
    ("ancestral", 10, "uniform"): 0.8,
    ("ddim", 10, "uniform"): 0.8,
    ("dpmpp-2m", 10, "uniform"): 0.8,
}
N_SAMPLES = 1000


# The samplers whose exact chains `reference_moments` writes; euler and heun are proved the same way on
# the rectified-flow path in tests/test_rectified_flow.py (and reproduce the data on this one there too).
CHAIN_SAMPLERS = ("ancestral", "ddim", "dpmpp-2m")


@pytest.mark.parametrize("name", CHAIN_SAMPLERS)
@pytest.mark.parametrize(("steps", "kind"), [(10, "logsnr"), (100, "logsnr"), (10, "uniform")])
def test_sampler_reproduces_gaussian_data(name, steps, kind):
    ts = time_grid(steps, kind, SCHED)
    torch.manual_seed(0)
    x = SAMPLERS[name](gaussian_denoise, torch.randn(N_SAMPLES, *SHAPE), ts, SCHED)
    values = x.transpose(0, 1).flatten(1).double()  # (C, N * D * H * W), voxels are independent
    n = values.shape[1]
    mean, var = values.mean(1), values.var(1)
    ref_mean, ref_var = reference_moments(name, ts)
    # Monte-Carlo standard errors: mean sqrt(var / n), relative variance sqrt(2 / n) = 0.2 % here.
    # Measured |MC - exact| <= 3 standard errors; allowed: 5 (mean) and 1.5 % (variance).
    torch.testing.assert_close(mean, ref_mean, atol=float(5 * (ref_var / n).sqrt().max()), rtol=0)
    torch.testing.assert_close(var, ref_var, atol=0, rtol=0.015)
    # Against the data itself.
    torch.testing.assert_close(mean, MU.double(), atol=0.01, rtol=0)
    torch.testing.assert_close(var, S.double() ** 2, atol=0, rtol=DATA_VAR_TOL[(name, steps, kind)])


def _per_sample_denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Depends on each sample only (no batch statistics), so batch splitting must not matter.
    return gaussian_denoise(x, t) + 0.1 * torch.tanh(x)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_one_step_returns_the_denoised_initial_noise(name):
    noise = torch.randn(3, *SHAPE)
    x = SAMPLERS[name](_per_sample_denoise, noise, time_grid(1), SCHED)
    torch.testing.assert_close(x, _per_sample_denoise(noise, torch.ones(3)))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generators_make_samples_reproducible_and_independent_of_batch_split(name):
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    ts = time_grid(6, "logsnr", SCHED)
    seeds = [11, 12, 13, 14]
    noise = randn_per_sample((4, *SHAPE), gens(seeds))
    full = SAMPLERS[name](_per_sample_denoise, noise, ts, SCHED, generators=gens(seeds))
    again = SAMPLERS[name](_per_sample_denoise, noise, ts, SCHED, generators=gens(seeds))
    torch.testing.assert_close(full, again, atol=0, rtol=0)
    halves = [
        SAMPLERS[name](_per_sample_denoise, noise[i : i + 2], ts, SCHED, generators=gens(seeds[i : i + 2]))
        for i in (0, 2)
    ]
    torch.testing.assert_close(torch.cat(halves), full)
    single = SAMPLERS[name](_per_sample_denoise, noise[2:3], ts, SCHED, generators=gens([13]))
    torch.testing.assert_close(single[0], full[2])
    if name == "ancestral":  # the fresh noise really comes from the generators
        other = SAMPLERS[name](_per_sample_denoise, noise, ts, SCHED, generators=gens([1, 2, 3, 4]))
        assert not torch.allclose(other, full)


def test_randn_per_sample_rows_come_from_their_generator():
    rows = randn_per_sample((3, 2, 5), [torch.Generator().manual_seed(s) for s in (0, 1, 2)])
    assert rows.shape == (3, 2, 5)
    torch.testing.assert_close(rows[1], torch.randn(2, 5, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        randn_per_sample((3, 5), [torch.Generator(), torch.Generator()])


def test_ddim_with_eta_one_is_ancestral_sampling():
    # Two different formulations (DDIM's eta and the VDM posterior) of the same stochastic step.
    ts = time_grid(8, "uniform")
    noise = torch.randn(2, *SHAPE)
    a = sample_ancestral(
        gaussian_denoise, noise, ts, SCHED, generators=[torch.Generator().manual_seed(i) for i in (0, 1)]
    )
    gens = [torch.Generator().manual_seed(i) for i in (0, 1)]
    b = sample("ddim", gaussian_denoise, noise, ts, SCHED, generators=gens, eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_and_project_hooks(name):
    ts = time_grid(5, "logsnr", SCHED)
    fixed = torch.full((2, 1, 8, 8, 8), 0.25)
    calls, projected = [], []

    def callback(i, t, x, x0):
        calls.append((i, float(t[0]), x.shape, x0.shape))

    def project(x, t):  # hold channel 0 at its forward-noised value, as marginalized sampling does
        projected.append(float(t[0]))
        x = x.clone()
        x[:, :1] = SCHED.add_noise(fixed, t, torch.zeros_like(fixed))
        return x

    x = sample(name, gaussian_denoise, torch.randn(2, *SHAPE), ts, SCHED, callback=callback, project=project)
    assert [c[0] for c in calls] == list(range(5))
    assert [c[1] for c in calls] == pytest.approx(ts[:-1].tolist())
    # Heun also projects its Euler predictor at s before evaluating it there (not at s = 0: last step)
    after = [[s, s] if name == "heun" and s > 0 else [s] for s in ts[1:].tolist()]
    assert projected == pytest.approx([s for pair in after for s in pair])
    assert calls[0][2] == calls[0][3] == (2, *SHAPE)
    torch.testing.assert_close(x[:, :1], fixed, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_are_dimension_agnostic_and_take_any_step_count(name):
    def denoise(x, t):  # data N(0, 0.5^2) on 2-D images (B, C, H, W)
        alpha, sigma = (append_dims(v, x.ndim) for v in SCHED.alpha_sigma(t))
        return alpha * 0.25 / (alpha**2 * 0.25 + sigma**2) * x

    for steps in (1, 2, 3, 17):
        x = sample(name, denoise, torch.randn(2, 3, 6, 6), time_grid(steps, "uniform"), SCHED)
        assert x.shape == (2, 3, 6, 6) and torch.isfinite(x).all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="valid samplers: ancestral, ddim, dpmpp-2m, euler, heun"):
        get_sampler("lms")
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        sample("lms", gaussian_denoise, torch.randn(1, *SHAPE), time_grid(2), SCHED)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ddim(gaussian_denoise, torch.randn(1, *SHAPE), torch.linspace(0, 1, 5), SCHED)
    with pytest.raises(ValueError, match="at least 2 times"):
        sample_ddim(gaussian_denoise, torch.randn(1, *SHAPE), torch.ones(1), SCHED)


def test_resample_rounds_keep_a_multistep_solver_multistep():
    """Bug: RePaint rounds ran every step as a single-step call, so dpmpp-2m silently became DDIM."""
    schedule = CosineSchedule()
    ts = time_grid(6, "logsnr", schedule)
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))

    def denoise(x, t):
        return torch.tanh(0.7 * x) + 0.1 * append_dims(t, x.ndim)

    def run(name, rounds):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return sample(name, denoise, noise, ts, schedule, generators=gens, resample_rounds=rounds)

    assert not torch.allclose(run("dpmpp-2m", 2), run("ddim", 2))
    assert torch.equal(run("dpmpp-2m", 0), run("dpmpp-2m", 0)) and not torch.equal(
        run("dpmpp-2m", 1), run("dpmpp-2m", 0)
    )
    with pytest.raises(ValueError, match="resample_rounds"):
        run("ddim", -1)
