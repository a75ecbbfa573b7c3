"""Generation from trained parts: the base stage from prompts, the SR stage from a low-resolution volume.

Used by the training previews and by `sample.py`. Everything is seeded per sample: sample i
depends only on seeds[i], never on how samples were batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medsyn.diffusion import ClassifierFreeGuidance, randn_per_sample, sample, time_grid

Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def generators_for(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, on `device`."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate_base(
    denoiser: torch.nn.Module,
    text: torch.nn.Module | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int = 25,
    sampler: str = "dpmpp-2m",
    guidance: float = 3.0,
    grid: str = "logsnr",
    project: Project | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Sample base volumes (B, C, *shape) for `prompts` (one seed each) with classifier-free guidance."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    device = next(denoiser.parameters()).device
    gens = generators_for(seeds, device)
    channels = denoiser.net.out_channels
    noise = randn_per_sample((len(seeds), channels, *shape), gens, device=device)
    cond: dict = {}
    uncond = None
    if text is not None:
        cond = dict(text.encode(list(prompts)))
        uncond = dict(text.null_condition(len(prompts), length=cond["context"].shape[1]))
    denoise = ClassifierFreeGuidance(denoiser, cond, uncond, scale=guidance if text is not None else 1.0)
    ts = time_grid(steps, grid, denoiser.schedule).to(device)
    return sample(
        sampler, denoise, noise, ts, denoiser.schedule, generators=gens, callback=callback, project=project
    )


@torch.no_grad()
def generate_sr(
    denoiser: torch.nn.Module,
    lowres: torch.Tensor,
    seeds: Sequence[int],
    steps: int = 20,
    sampler: str = "dpmpp-2m",
    lowres_noise: float = 0.0,
    grid: str = "logsnr",
    project: Project | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Sample high-resolution volumes given `lowres` (B, C, *S) already upsampled to the target grid."""
    device = next(denoiser.parameters()).device
    lowres = lowres.to(device)
    gens = generators_for(seeds, device)
    b = lowres.shape[0]
    noise = randn_per_sample((b, denoiser.net.out_channels, *lowres.shape[2:]), gens, device=device)
    aug_t = torch.full((b,), float(lowres_noise), device=device)
    aug_noise = randn_per_sample(lowres.shape, gens, device=device)
    cond = {"concat": denoiser.schedule.add_noise(lowres, aug_t, aug_noise), "aug_t": aug_t}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, **cond)

    ts = time_grid(steps, grid, denoiser.schedule).to(device)
    return sample(
        sampler, denoise, noise, ts, denoiser.schedule, generators=gens, callback=callback, project=project
    )
