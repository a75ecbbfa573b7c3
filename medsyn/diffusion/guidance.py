"""Classifier-free guidance (Ho & Salimans, 2022) as a `denoise(x, t) -> x0` closure for the samplers.

x0 = x0_uncond + g (x0_cond - x0_uncond): g = 1 is the conditional model, g = 0 the unconditional
one, g > 1 trades diversity for prompt adherence. Conditional and unconditional passes run as one
batched forward when the two condition dicts have matching shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from medsyn.diffusion.schedule import append_dims

Cond = Mapping[str, Any]


def _batchable(cond: Cond, uncond: Cond) -> bool:
    """True when every entry is a tensor and cond/uncond match in keys and non-batch shapes."""
    if set(cond) != set(uncond):
        return False
    for key, c in cond.items():
        u = uncond[key]
        if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)) or c.shape[1:] != u.shape[1:]:
            return False
    return True


def _expand_batch(cond: Cond, batch: int) -> dict[str, Any]:
    """Broadcast tensors with batch size 1 to `batch` (one shared empty prompt for all samples)."""
    return {
        k: v.expand(batch, *v.shape[1:])
        if isinstance(v, torch.Tensor) and v.shape[0] == 1 and batch > 1
        else v
        for k, v in cond.items()
    }


class ClassifierFreeGuidance:
    """Wrap a denoiser `denoiser(x, t, **cond) -> x0` and a cond/uncond pair into `denoise(x, t)`.

    scale: guidance weight g; at g = 1 only the conditional pass runs.
    interval: (t_lo, t_hi): guidance applies only for t in this range, elsewhere g = 1 (guidance in a
        limited interval, Kynkaanniemi et al., 2024); the default (0, 1) guides everywhere.
    rescale: phi in [0, 1]; blends the guided x0 with a copy rescaled to the conditional x0's
        per-sample standard deviation (Lin et al., 2024), which counters over-saturation at large g.
    `uncond` entries may have batch size 1 (broadcast to the batch).
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        cond: Cond,
        uncond: Cond | None = None,
        scale: float = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
        rescale: float = 0.0,
    ) -> None:
        if scale != 1.0 and uncond is None:
            raise ValueError(f"guidance scale {scale} needs an unconditional condition (uncond)")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        if not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.uncond = None if uncond is None else dict(uncond)
        self.scale = float(scale)
        self.interval = (float(interval[0]), float(interval[1]))
        self.rescale = float(rescale)

    def _both(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_cond, x0_uncond), each (B, C, ...), from one batched forward when possible."""
        batch = x.shape[0]
        uncond = _expand_batch(self.uncond or {}, batch)
        if _batchable(self.cond, uncond):
            both = {k: torch.cat([self.cond[k], uncond[k].to(self.cond[k].device)]) for k in self.cond}
            x0 = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, C, ...)
            return x0[:batch], x0[batch:]
        return self.denoiser(x, t, **self.cond), self.denoiser(x, t, **uncond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided x0 estimate (B, C, ...) at x (B, C, ...), t (B,)."""
        lo, hi = self.interval
        g = torch.where((t >= lo) & (t <= hi), self.scale, 1.0).to(x.dtype)  # (B,)
        if self.scale == 1.0 or bool((g == 1.0).all()):
            return self.denoiser(x, t, **self.cond)
        x0_cond, x0_uncond = self._both(x, t)
        g = append_dims(g, x.ndim)
        x0 = x0_uncond + g * (x0_cond - x0_uncond)
        if self.rescale > 0.0:
            dims = tuple(range(1, x.ndim))
            ratio = x0_cond.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp(min=1e-8)
            x0 = self.rescale * (x0 * ratio) + (1.0 - self.rescale) * x0
        return x0


def guided_denoiser(
    denoiser: Callable[..., torch.Tensor],
    cond: Cond,
    uncond: Cond | None = None,
    scale: float = 1.0,
    **kwargs: Any,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Shorthand for `ClassifierFreeGuidance(denoiser, cond, uncond, scale, **kwargs)`."""
    return ClassifierFreeGuidance(denoiser, cond, uncond, scale, **kwargs)
