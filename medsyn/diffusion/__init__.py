"""Diffusion core: cosine and rectified-flow schedules in continuous time, x0/eps/v/flow denoiser,
per-sample loss, classifier-free guidance, samplers sharing one signature (ancestral, DDIM,
DPM-Solver++(2M), Euler, Heun) and inpainting (fixed channels, RePaint).

Everything talks through one interface, `denoise(x, t) -> x0` with x (B, C, ...) and t (B,) in [0, 1],
and works unchanged for 2-D images and 3-D volumes.
"""

from medsyn.diffusion.denoiser import PARAMETERIZATIONS, Denoiser, build_denoiser
from medsyn.diffusion.guidance import ClassifierFreeGuidance, guided_denoiser
from medsyn.diffusion.inpaint import HoldFixed
from medsyn.diffusion.loss import DiffusionLoss, sample_times
from medsyn.diffusion.sampling import (
    EVALS_PER_STEP,
    SAMPLERS,
    get_sampler,
    network_evaluations,
    randn_per_sample,
    renoise,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from medsyn.diffusion.schedule import (
    SCHEDULES,
    TIME_GRIDS,
    CosineSchedule,
    RectifiedFlowSchedule,
    Schedule,
    append_dims,
    build_schedule,
    time_grid,
)

__all__ = [
    "EVALS_PER_STEP",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SCHEDULES",
    "TIME_GRIDS",
    "Schedule",
    "ClassifierFreeGuidance",
    "CosineSchedule",
    "RectifiedFlowSchedule",
    "Denoiser",
    "DiffusionLoss",
    "HoldFixed",
    "append_dims",
    "build_denoiser",
    "build_schedule",
    "get_sampler",
    "network_evaluations",
    "guided_denoiser",
    "randn_per_sample",
    "renoise",
    "sample",
    "sample_ancestral",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sample_times",
    "time_grid",
]
