"""Tests for medsyn.diffusion.denoiser and medsyn.diffusion.loss: parameterisations and the L2 loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsyn.diffusion.denoiser import PARAMETERIZATIONS, Denoiser, target_from
from medsyn.diffusion.loss import DiffusionLoss, sample_times
from medsyn.diffusion.sampling import sample_dpmpp_2m
from medsyn.diffusion.schedule import CosineSchedule, append_dims, time_grid


class OracleNet(nn.Module):
    """Knows the clean x0 and the noise of the current batch and outputs the exact target, so a
    Denoiser around it must recover x0 whatever the parameterisation."""

    def __init__(self, schedule: CosineSchedule, parameterization: str) -> None:
        super().__init__()
        self.schedule, self.parameterization = schedule, parameterization
        self.x0: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.seen: dict = {}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.seen = {"t": t, **cond}
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = append_dims(alpha, x_t.ndim), append_dims(sigma, x_t.ndim)
        return target_from(self.x0, self.noise, alpha, sigma, self.parameterization)


class ZeroNet(nn.Module):
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return torch.zeros_like(x_t)


def _oracle(parameterization: str, x0: torch.Tensor, noise: torch.Tensor) -> Denoiser:
    sched = CosineSchedule()
    net = OracleNet(sched, parameterization)
    net.x0, net.noise = x0, noise
    return Denoiser(net, sched, parameterization)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_exact_net_gives_the_same_x0_in_every_parameterization(parameterization):
    x0, noise = (
        torch.randn(5, 4, 6, 6, 6, dtype=torch.float64),
        torch.randn(5, 4, 6, 6, 6, dtype=torch.float64),
    )
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    den = _oracle(parameterization, x0, noise)
    x_t = den.schedule.add_noise(x0, t, noise)
    torch.testing.assert_close(den(x_t, t), x0)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_loss_is_per_sample_and_zero_for_an_exact_net(parameterization):
    x0, noise = torch.randn(3, 4, 4, 4, 4), torch.randn(3, 4, 4, 4, 4)
    den = _oracle(parameterization, x0, noise)
    t = torch.tensor([0.1, 0.5, 0.9])
    loss = DiffusionLoss()(den, x0, t=t, noise=noise)
    assert loss.shape == (3,)
    assert loss.abs().max() < 1e-10
    # Measured in x0 space, an exact eps or v net is still (numerically) exact away from t = 1.
    loss_x0 = DiffusionLoss("x0")(den, x0, t=t, noise=noise)
    assert loss_x0.abs().max() < 1e-8


def test_loss_value_of_a_zero_net_in_each_space():
    # A net predicting zeros has loss mean(target^2): |x0|^2 for x0, |noise|^2 for eps.
    x0, noise = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    t = torch.tensor([0.3, 0.6])
    for p, expected in [("x0", x0.square().mean((1, 2, 3))), ("eps", noise.square().mean((1, 2, 3)))]:
        den = Denoiser(ZeroNet(), CosineSchedule(), p)
        torch.testing.assert_close(DiffusionLoss()(den, x0, t=t, noise=noise), expected)


def test_loss_in_another_space_converts_the_prediction():
    # x0 net predicting zeros, loss in eps space: eps_hat = x_t / sigma, target = noise.
    sched = CosineSchedule()
    x0, noise = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    den = Denoiser(ZeroNet(), sched, "x0")
    x_t = sched.add_noise(x0, t, noise)
    sigma = append_dims(sched.alpha_sigma(t)[1], 4)
    expected = (x_t / sigma - noise).square().mean((1, 2, 3)).float()
    torch.testing.assert_close(DiffusionLoss("eps")(den, x0, t=t, noise=noise), expected)


def test_channel_weights_scale_each_channel():
    x0 = torch.zeros(2, 4, 3, 3, 3)
    x0[:, 2] = 1.0  # only the airway channel carries error for a zero net
    den = Denoiser(ZeroNet(), CosineSchedule(), "x0")
    t = torch.tensor([0.5, 0.5])
    plain = DiffusionLoss()(den, x0, t=t)
    weighted = DiffusionLoss(channel_weights=[1.0, 1.0, 3.0, 1.0])(den, x0, t=t)
    torch.testing.assert_close(plain, torch.full((2,), 0.25))
    torch.testing.assert_close(weighted, 3 * plain)
    with pytest.raises(ValueError, match="2 entries but the data has 4 channels"):
        DiffusionLoss(channel_weights=[1.0, 2.0])(den, x0, t=t)
    with pytest.raises(ValueError, match="non-negative"):
        DiffusionLoss(channel_weights=[1.0, -1.0])


def test_condition_and_time_reach_the_network_and_generator_makes_it_reproducible():
    x0 = torch.randn(4, 2, 4, 4)
    den = _oracle("x0", x0, torch.zeros_like(x0))
    ctx = torch.randn(4, 7, 16)
    loss = DiffusionLoss(time_sampling="stratified")
    a = loss(den, x0, {"context": ctx}, generator=torch.Generator().manual_seed(3))
    t_a = den.net.seen["t"]
    assert den.net.seen["context"] is ctx
    assert t_a.shape == (4,) and ((t_a >= 0) & (t_a < 1)).all()
    b = loss(den, x0, {"context": ctx}, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(den.net.seen["t"], t_a)


def test_stratified_times_cover_every_stratum():
    t = sample_times(8, "stratified", torch.Generator().manual_seed(0))
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))
    with pytest.raises(ValueError, match="valid: uniform, stratified"):
        sample_times(8, "sobol")


def test_unknown_parameterization_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid parameterizations: x0, eps, v"):
        Denoiser(ZeroNet(), CosineSchedule(), "score")
    with pytest.raises(ValueError, match="valid parameterizations: x0, eps, v"):
        DiffusionLoss("score")
    with pytest.raises(ValueError, match="valid: uniform, stratified"):
        DiffusionLoss(time_sampling="sobol")


class GaussianNet(nn.Module):
    """Exact prediction, in a given parameterisation, for data x0 ~ N(0.3, 0.5^2)."""

    def __init__(self, schedule: CosineSchedule, parameterization: str) -> None:
        super().__init__()
        self.schedule, self.parameterization = schedule, parameterization

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (append_dims(v, x_t.ndim) for v in self.schedule.alpha_sigma(t))
        x0 = 0.3 + alpha * 0.25 / (alpha**2 * 0.25 + sigma**2) * (x_t - alpha * 0.3)
        eps = (x_t - alpha * x0) / sigma
        return target_from(x0, eps, alpha, sigma, self.parameterization)


def test_exact_nets_in_every_parameterization_sample_alike():
    sched = CosineSchedule()
    noise = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64)
    ts = time_grid(12, "logsnr", sched)
    outs = {
        p: sample_dpmpp_2m(Denoiser(GaussianNet(sched, p), sched, p), noise, ts, sched)
        for p in PARAMETERIZATIONS
    }
    torch.testing.assert_close(outs["eps"], outs["x0"])
    torch.testing.assert_close(outs["v"], outs["x0"])
