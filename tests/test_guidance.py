"""Tests for medsyn.diffusion.guidance: classifier-free guidance around a conditional denoiser."""

from __future__ import annotations

import pytest
import torch

from medsyn.diffusion.guidance import ClassifierFreeGuidance, guided_denoiser
from medsyn.diffusion.sampling import sample_ddim
from medsyn.diffusion.schedule import CosineSchedule, append_dims, time_grid


class CountingDenoiser:
    """x0 = x * (1 - t) + (masked mean of the context) per sample; records each call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor):
        self.batches.append(x.shape[0])
        m = context_mask.unsqueeze(-1).to(context.dtype)  # (B, L, 1)
        pooled = (context * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)  # (B,)
        return x * append_dims(1 - t, x.ndim) + append_dims(pooled, x.ndim)


def _conds(batch: int = 3, length: int = 5, dim: int = 8):
    cond = {"context": torch.randn(batch, length, dim), "context_mask": torch.rand(batch, length) > 0.3}
    uncond = {
        "context": torch.zeros(batch, length, dim),
        "context_mask": torch.zeros(batch, length, dtype=torch.bool),
    }
    return cond, uncond


def test_scale_one_is_the_conditional_denoiser_in_a_single_pass():
    den = CountingDenoiser()
    cond, uncond = _conds()
    x, t = torch.randn(3, 2, 4, 4, 4), torch.rand(3)
    out = ClassifierFreeGuidance(den, cond, uncond, scale=1.0)(x, t)
    torch.testing.assert_close(out, den(x, t, **cond))
    assert den.batches[0] == 3  # no unconditional pass was run


def test_scale_zero_is_the_unconditional_denoiser():
    den = CountingDenoiser()
    cond, uncond = _conds()
    x, t = torch.randn(3, 2, 4, 4, 4), torch.rand(3)
    torch.testing.assert_close(
        ClassifierFreeGuidance(den, cond, uncond, scale=0.0)(x, t), den(x, t, **uncond)
    )


def test_guided_estimate_extrapolates_in_one_batched_forward():
    den = CountingDenoiser()
    cond, uncond = _conds()
    x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
    out = guided_denoiser(den, cond, uncond, scale=3.0)(x, t)
    assert den.batches == [6]  # cond and uncond concatenated along the batch
    x0_c, x0_u = den(x, t, **cond), den(x, t, **uncond)
    torch.testing.assert_close(out, x0_u + 3.0 * (x0_c - x0_u))


def test_uncond_of_batch_one_and_mismatched_shapes():
    den = CountingDenoiser()
    cond, _ = _conds(length=5)
    x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
    shared = {"context": torch.zeros(1, 5, 8), "context_mask": torch.ones(1, 5, dtype=torch.bool)}
    out = ClassifierFreeGuidance(den, cond, shared, scale=2.0)(x, t)
    assert den.batches == [6]
    x0_c, x0_u = den(x, t, **cond), den(x, t, **{k: v.expand(3, *v.shape[1:]) for k, v in shared.items()})
    torch.testing.assert_close(out, 2.0 * x0_c - x0_u)
    # A different token length cannot be concatenated: two passes, same result.
    den.batches.clear()
    short = {"context": torch.zeros(3, 2, 8), "context_mask": torch.ones(3, 2, dtype=torch.bool)}
    out = ClassifierFreeGuidance(den, cond, short, scale=2.0)(x, t)
    assert den.batches == [3, 3]
    torch.testing.assert_close(out, 2.0 * x0_c - den(x, t, **short))


def test_interval_limits_guidance_to_a_range_of_times():
    den = CountingDenoiser()
    cond, uncond = _conds()
    x = torch.randn(3, 2, 4, 4)
    cfg = ClassifierFreeGuidance(den, cond, uncond, scale=4.0, interval=(0.2, 0.6))
    t = torch.tensor([0.1, 0.4, 0.9])
    out = cfg(x, t)
    x0_c, x0_u = den(x, t, **cond), den(x, t, **uncond)
    torch.testing.assert_close(out[[0, 2]], x0_c[[0, 2]])
    torch.testing.assert_close(out[1], (x0_u + 4.0 * (x0_c - x0_u))[1])
    den.batches.clear()
    cfg(x, torch.full((3,), 0.9))  # outside the interval: conditional pass only
    assert den.batches == [3]


def test_rescale_matches_the_conditional_spread():
    den = CountingDenoiser()
    cond, uncond = _conds()
    x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
    out = ClassifierFreeGuidance(den, cond, uncond, scale=5.0, rescale=1.0)(x, t)
    x0_c = den(x, t, **cond)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), x0_c.std(dim=(1, 2, 3)))


def test_guidance_plugs_into_a_sampler():
    sched = CosineSchedule()
    cond, uncond = _conds(batch=2)
    cfg = ClassifierFreeGuidance(CountingDenoiser(), cond, uncond, scale=2.5)
    x = sample_ddim(cfg, torch.randn(2, 2, 4, 4, 4), time_grid(4), sched)
    assert x.shape == (2, 2, 4, 4, 4) and torch.isfinite(x).all()


def test_invalid_arguments_are_named():
    cond, uncond = _conds()
    with pytest.raises(ValueError, match="needs an unconditional"):
        ClassifierFreeGuidance(CountingDenoiser(), cond, None, scale=2.0)
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(CountingDenoiser(), cond, uncond, scale=2.0, rescale=1.5)
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(CountingDenoiser(), cond, uncond, scale=2.0, interval=(0.8, 0.2))
