"""Tests for medsyn.diffusion.schedule: cosine logSNR schedule, forward process, time grids."""

from __future__ import annotations

import math

import pytest
import torch

from medsyn.diffusion.schedule import CosineSchedule, append_dims, build_schedule, time_grid


def test_append_dims_broadcasts_batch_vector():
    t = torch.arange(3.0)
    assert append_dims(t, 5).shape == (3, 1, 1, 1, 1)
    assert append_dims(t, 1).shape == (3,)
    with pytest.raises(ValueError, match="more than the target"):
        append_dims(torch.zeros(2, 2), 1)


def test_logsnr_is_finite_clipped_and_decreasing():
    sched = CosineSchedule()
    t = torch.linspace(0, 1, 101)
    lam = sched.logsnr(t)
    assert torch.isfinite(lam).all()
    assert lam[0].item() == pytest.approx(15.0, abs=1e-9)
    assert lam[-1].item() == pytest.approx(-15.0, abs=1e-9)
    assert (lam[1:] < lam[:-1]).all()


def test_logsnr_matches_cosine_away_from_the_ends():
    # Clipping only bends the curve near t = 0 and t = 1; at t = 0.5 it is -2 log tan(pi / 4) = 0 up to
    # the tiny reparametrisation, and matches the unclipped form closely in the middle.
    sched = CosineSchedule()
    t = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    plain = -2 * torch.log(torch.tan(math.pi * t / 2))
    torch.testing.assert_close(sched.logsnr(t), plain, atol=2e-3, rtol=0)


def test_alpha_sigma_variance_preserving_and_dtype():
    sched = CosineSchedule()
    t = torch.rand(64)
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.dtype == torch.float32 and alpha.shape == (64,)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(64))
    a0, s0 = sched.alpha_sigma(0.0)
    a1, s1 = sched.alpha_sigma(1.0)
    assert a0 > 0.9999 and s0 < 1e-3 and a1 < 1e-3 and s1 > 0.9999


def test_t_from_logsnr_inverts_logsnr_with_shift():
    for shift in (1.0, 2.0, 0.5):
        sched = CosineSchedule(shift=shift)
        t = torch.linspace(0, 1, 33, dtype=torch.float64)
        torch.testing.assert_close(sched.t_from_logsnr(sched.logsnr(t)), t)


def test_shift_adds_noise_by_its_square():
    base, shifted = CosineSchedule(), CosineSchedule(shift=2.0)
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shifted.logsnr(t), base.logsnr(t) - 2 * math.log(2.0))


def test_add_noise_on_volumes_and_images():
    sched = CosineSchedule()
    for shape in [(3, 4, 5, 6, 7), (3, 2, 8, 8), (3, 5)]:
        x0, noise = torch.randn(shape), torch.randn(shape)
        t = torch.tensor([0.0, 0.5, 1.0])
        x_t = sched.add_noise(x0, t, noise)
        assert x_t.shape == shape
        alpha, sigma = sched.alpha_sigma(t)
        torch.testing.assert_close(x_t[1], alpha[1] * x0[1] + sigma[1] * noise[1])
        # t = 0 is almost clean and t = 1 almost pure noise: sigma_0 = alpha_1 = exp(-7.5) ~ 5.5e-4.
        bound = 6e-4 * (x0.abs().max() + noise.abs().max()).item()
        torch.testing.assert_close(x_t[0], x0[0], atol=bound, rtol=0)
        torch.testing.assert_close(x_t[2], noise[2], atol=bound, rtol=0)


@pytest.mark.parametrize("kind", ["uniform", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 10, 250])
def test_time_grid_descends_from_one_to_zero(kind, steps):
    ts = time_grid(steps, kind, CosineSchedule())
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float32
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert (ts[1:] < ts[:-1]).all()


def test_logsnr_grid_is_evenly_spaced_in_logsnr():
    sched = CosineSchedule()
    lam = sched.logsnr(time_grid(10, "logsnr", sched, dtype=torch.float64))
    torch.testing.assert_close(lam.diff(), torch.full((10,), 3.0, dtype=torch.float64))


def test_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid kinds: uniform, logsnr"):
        time_grid(10, "karras")
    with pytest.raises(ValueError, match="needs the schedule"):
        time_grid(10, "logsnr")
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(0)
    with pytest.raises(ValueError, match="valid schedules: cosine"):
        build_schedule("linear")
    with pytest.raises(ValueError, match="logsnr_min"):
        CosineSchedule(logsnr_min=5.0, logsnr_max=-5.0)
    assert build_schedule("cosine", shift=2.0).shift == 2.0
