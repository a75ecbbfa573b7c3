"""The super-resolution stage's conditioner: the upsampled low-resolution volume, noise-augmented.

Cascaded diffusion (Ho et al., 2022) trains the SR model on a low-resolution input corrupted by the
forward process at a random level in [0, noise_max] and tells the network that level (`aug_t`), so at
sampling a small fixed level (`noise_sample`) hides the base model's artefacts. The same module
conditions training batches, validation and generation, so the three can never drift apart. It takes
the four volume channels and concatenates them in the channels the network denoises (`lobe_encoding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medsyn.data.channels import net_channels, to_net
from medsyn.data.grid import UPSAMPLE_MODES, upsample
from medsyn.diffusion import build_schedule, randn_per_sample
from medsyn.errors import ConfigError

Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(shape: Sequence[int], generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """Normal noise of `shape` from one generator, or one generator per sample (row i from generator i)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype, generator=generator)
    return randn_per_sample(shape, generator, like.device, like.dtype)


class LowResConditioner(nn.Module):
    """{"concat": (B, C, *S) noised upsampled volume, "aug_t": (B,)} from a (B, 4, *S) low-resolution
    volume; C is the network's channel count for the lobe encoding.

    noise_max: training draws the augmentation level uniformly in [0, noise_max] (diffusion time).
    noise_sample: the level used outside training (validation, generation); within [0, noise_max].
    upsample: how a base output is brought to the SR grid ("nearest" or "trilinear"); the training data
        is upsampled the same way, so sampling conditions the model exactly as it was trained.
    schedule, schedule_shift: the diffusion schedule the levels are times of; the builder passes the
        run's own (`diffusion` section), so augmentation and denoising share one schedule.
    lobe_encoding: the run's (`medsyn.data.channels.to_net`): the volume is concatenated as the network
        denoises its own (bits: exact bits of the nearest lobe labels), passed by the builder.
    """

    key = "lowres"  # the batch entry it conditions on: (B, C, *S) already on the SR grid

    def __init__(
        self,
        noise_max: float = 0.0,
        noise_sample: float = 0.0,
        upsample: str = "nearest",
        schedule: str = "cosine",
        schedule_shift: float = 1.0,
        lobe_encoding: str = "levels",
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"lowres.upsample={upsample!r}: expected one of {', '.join(UPSAMPLE_MODES)}")
        if not 0.0 <= float(noise_max) <= 1.0:
            raise ConfigError(f"lowres.noise_max={noise_max}: expected a diffusion time in [0, 1]")
        self.noise_max, self.upsample_mode = float(noise_max), upsample
        self.noise_sample = self.check_level(noise_sample, "lowres.noise_sample")
        self.schedule = build_schedule(schedule, shift=schedule_shift)
        self.lobe_encoding = lobe_encoding

    def extra_repr(self) -> str:
        return (
            f"noise_max={self.noise_max}, noise_sample={self.noise_sample}, upsample={self.upsample_mode!r}, "
            f"lobe_encoding={self.lobe_encoding!r}"
        )

    def check_level(self, level: float, name: str = "the low-resolution noise level") -> float:
        """`level` if the model was trained on it (0 <= level <= noise_max), else a ConfigError naming it."""
        level = float(level)
        if not 0.0 <= level <= self.noise_max:
            raise ConfigError(
                f"{name}={level:g}: the SR model was trained with low-resolution noise levels in "
                f"[0, {self.noise_max:g}] (lowres.noise_max); expected a level in that range"
            )
        return level

    def upsample(self, lowres: torch.Tensor, factor: int) -> torch.Tensor:
        """(B, C, *s) low-resolution volumes -> (B, C, *s x factor) on the SR grid, as in training."""
        return torch.stack([upsample(v, factor, self.upsample_mode) for v in lowres])

    def forward(
        self,
        lowres: torch.Tensor,
        *,
        train: bool = False,
        generator: Generators = None,
        level: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise-augment `lowres` (B, 4, *S), in the network's channels: at a random level in training, else
        at `level` (default `noise_sample`). `generator` is one generator, or one per sample (generation)."""
        lowres = to_net(lowres, self.lobe_encoding)  # (B, C, *S)
        b = lowres.shape[0]
        if train:
            gen_device = generator.device if isinstance(generator, torch.Generator) else lowres.device
            aug_t = torch.rand(b, device=gen_device, generator=generator).to(lowres.device) * self.noise_max
        else:
            value = self.noise_sample if level is None else self.check_level(level)
            aug_t = torch.full((b,), value, device=lowres.device)
        noise = _randn(lowres.shape, generator, lowres)
        return {"concat": self.schedule.add_noise(lowres, aug_t, noise), "aug_t": aug_t}

    def unconditional(self, cond: dict[str, torch.Tensor]) -> None:
        """No unconditional branch: the SR model always sees its low-resolution input (no guidance)."""
        return None

    def unet_arguments(self) -> dict[str, Any]:
        """UNet constructor arguments this conditioner fixes: the noise-level embedding, and the input
        channels: the noisy volume's and the concatenated one's, both in the network's channels."""
        return {"augment_embedding": True, "in_channels": 2 * len(net_channels(self.lobe_encoding))}
