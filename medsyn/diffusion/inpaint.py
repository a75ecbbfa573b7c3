"""Inpainting with a diffusion model: hold some channels at given values while the rest are sampled.

Marginalized sampling (MedSyn IV.D, V.D) generates the free channels of a volume given fixed ones.
`HoldFixed` is the samplers' `project(x, t)` hook: after every step the fixed channels are replaced by
their forward-noised value alpha_t x_fixed + sigma_t eps (fresh eps from each sample's generator), and
by x_fixed itself at t = 0, so a fixed channel comes back exactly as given. Any sampler becomes the
RePaint sampler (Lugmayr et al., 2022) with this hook and `resample_rounds` > 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medsyn.diffusion.sampling import randn_per_sample
from medsyn.diffusion.schedule import Schedule


class HoldFixed:
    """The samplers' `project(x, t)` hook: fixed channels <- alpha_t x_fixed + sigma_t eps, or x_fixed at t = 0.

    values: (1 | B, k, *S) encoded fixed channels; index: their k channel indices in x.
    eps is drawn from `generators` (one per sample), so a sample stays independent of its batch.
    """

    def __init__(
        self,
        values: torch.Tensor,
        index: Sequence[int],
        schedule: Schedule,
        generators: Sequence[torch.Generator],
    ) -> None:
        self.values, self.index = values, list(index)
        self.schedule, self.generators = schedule, list(generators)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        fixed = self.values.to(device=x.device, dtype=x.dtype).expand(b, *self.values.shape[1:])  # (B, k, *S)
        x = x.clone()
        if bool((t <= 0).all()):
            x[:, self.index] = fixed
            return x
        noise = randn_per_sample(fixed.shape, self.generators, x.device, x.dtype)
        x[:, self.index] = self.schedule.add_noise(fixed, t.to(x.device), noise)
        return x
