"""Generation from trained models: one sampling routine for any model, and the base -> SR cascade.

`generate` samples a batch from a `DiffusionModel` given the raw inputs of its conditioners (report
texts for the base model, the upsampled low-resolution volume for the SR model). `synthesize` runs the
cascade `sample.py` runs. Volumes in and out have the four channels (lobes as levels), whatever channels
the network denoises (`DiffusionModel.to_net`). Everything is seeded per sample: sample i depends only on
seeds[i], never on how samples were batched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from medsyn.data.channels import CHANNELS, net_channels, to_net
from medsyn.diffusion import SAMPLERS, ClassifierFreeGuidance, HoldFixed, randn_per_sample, sample, time_grid
from medsyn.errors import ConfigError
from medsyn.generation.fixed import FixedChannels
from medsyn.generation.model import DiffusionModel
from medsyn.generation.windowed import windowed_denoiser

Hold = tuple[torch.Tensor, Sequence[int]]  # encoded fixed channels (1 | B, k, *S), their indices in CHANNELS
SR_SEED_OFFSET = 1 << 40  # the SR stage of sample i draws from seed_i + offset: noise unrelated to the base's
SR_MODES = ("full", "window")
# Default step counts, chosen by `benchmarks/sampling.py sweep` (README, "Sampling"): the fewest DPM-Solver++(2M)
# base steps whose evaluation measures match 250-step sampling within their standard errors.
DEFAULT_STEPS = 10
DEFAULT_SR_STEPS = 10


def generators_for(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, on `device`."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate(
    model: DiffusionModel,
    inputs: Mapping[str, Any],
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int = DEFAULT_STEPS,
    sampler: str = "dpmpp-2m",
    guidance: float = 3.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    guidance_rescale: float = 0.0,
    grid: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    hold: Hold | None = None,
    resample_rounds: int = 0,
    window: int | None = None,
    overlap: float = 0.2,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Sample volumes (B, 4, *shape), one per seed, conditioned on `inputs` (one entry per conditioner).

    guidance: classifier-free guidance scale, with its interval and rescale (see
        `ClassifierFreeGuidance`); it applies when the model has a null condition, else the scale is 1.
    options: per-conditioner options, e.g. {"lowres": {"level": 0.05}} (the SR noise-augmentation level).
    hold: fixed channels kept at every step (marginalized sampling); resample_rounds: RePaint rounds.
    window: evaluate the network on windows of this size blended with `overlap` (bounded memory, see
        `medsyn.generation.windowed`); None runs it on the full volume.
    """
    device = model.device
    gens = generators_for(seeds, device)
    noise = randn_per_sample((len(seeds), model.out_channels, *shape), gens, device=device)
    cond = model.condition(inputs, generator=gens, options=options)
    uncond = model.unconditional(cond)
    scale = float(guidance) if uncond is not None else 1.0
    if window is not None:
        if scale != 1.0:
            raise ConfigError("windowed evaluation runs without classifier-free guidance; use guidance 1")
        denoise = windowed_denoiser(model.denoiser, cond, window, overlap)
    else:
        denoise = ClassifierFreeGuidance(
            model.denoiser, cond, uncond, scale=scale, interval=guidance_interval, rescale=guidance_rescale
        )
    schedule = model.denoiser.schedule
    ts = grid_for(model, steps, grid).to(device)
    project = None
    if hold is not None:
        names = [CHANNELS[i] for i in hold[1]]
        held, net = net_channels(model.lobe_encoding, names), net_channels(model.lobe_encoding)
        values = to_net(hold[0], model.lobe_encoding, names)
        project = HoldFixed(values, [net.index(n) for n in held], schedule, gens)
        noise = project(noise, ts[:1].expand(noise.shape[0]))  # the fixed channels, noised, in x_1 too
    x = sample(
        sampler, denoise, noise, ts, schedule, generators=gens, callback=callback, project=project,
        resample_rounds=resample_rounds,
    )  # fmt: skip
    return model.from_net(x)


def add_sampling_arguments(parser) -> None:
    """The sampling options `sample.py` and `medsyn controllability` share, with the defaults above."""
    parser.add_argument("--batch-size", type=int, default=1,
                        help="samples per forward (results do not depend on it)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"base sampler steps (default {DEFAULT_STEPS})")  # fmt: skip
    parser.add_argument("--sr-steps", type=int, default=DEFAULT_SR_STEPS,
                        help=f"SR sampler steps (default {DEFAULT_SR_STEPS})")  # fmt: skip
    parser.add_argument("--sampler", default="dpmpp-2m", choices=list(SAMPLERS),
                        help="ODE/SDE solver (default dpmpp-2m; euler/heun suit rectified-flow models)")  # fmt: skip
    parser.add_argument(
        "--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32", choices=list(PRECISIONS),
                        help="bf16: the networks under bfloat16 autocast (faster on GPUs and AVX-512 BF16 CPUs)")  # fmt: skip


def grid_for(model: DiffusionModel, steps: int, grid: str | None) -> torch.Tensor:
    """The sampler's time grid for `model` (`time_grid`); a grid its schedule cannot take is a ConfigError."""
    try:
        return time_grid(steps, grid, model.denoiser.schedule)
    except ValueError as err:
        raise ConfigError(f"grid {grid!r}: {err}") from err


def generate_base(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], shape: Sequence[int],
                  **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """Base volumes (B, C, *shape) for `prompts`, one seed each; `kwargs` as for `generate`."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    return generate(model, model.report_inputs(prompts), seeds, shape, **kwargs)


def generate_sr(
    model: DiffusionModel, lowres: torch.Tensor, seeds: Sequence[int], lowres_noise: float | None = None,
    **kwargs: Any,
) -> torch.Tensor:  # fmt: skip
    """High-resolution volumes given `lowres` (B, C, *S) already on the target grid (see
    `LowResConditioner.upsample`); `lowres_noise` defaults to the level the run samples at."""
    options = {"lowres": {"level": lowres_noise}} if lowres_noise is not None else None
    kwargs.setdefault("guidance", 1.0)
    lowres = lowres.to(model.device)
    return generate(model, {"lowres": lowres}, seeds, lowres.shape[2:], options=options, **kwargs)


PRECISIONS = ("32", "bf16")


def autocast(device: torch.device, precision: str):
    """The networks' autocast context for a sampling `precision` ("32": none)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class SampleOptions:
    """How `synthesize` samples; defaults cost about 0.24 PFLOP per 256^3 sample at paper scale.

    guidance_interval, guidance_rescale: see `ClassifierFreeGuidance`; lowres_noise: the SR model's
    noise-augmentation level (None: the level the run was configured to sample at); precision: "32", or
    "bf16" to run the networks under bfloat16 autocast (the sampler's arithmetic stays float32), as
    `precision: bf16-mixed` trains them: ~1.6x faster on a CPU with AVX-512 BF16, more on a GPU.
    """

    steps: int = DEFAULT_STEPS
    sr_steps: int = DEFAULT_SR_STEPS
    sampler: str = "dpmpp-2m"
    guidance: float = 3.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    guidance_rescale: float = 0.0
    grid: str | None = None  # the time grid: None, each model's schedule's default (see `time_grid`)
    resample_rounds: int = 0
    sr_mode: str = "full"
    window: int = 144
    overlap: float = 0.2
    lowres_noise: float | None = None
    batch_size: int = 1
    precision: str = "32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.sr_mode not in SR_MODES:
            raise ConfigError(f"sr mode {self.sr_mode!r}: expected one of {', '.join(SR_MODES)}")
        for name in ("steps", "sr_steps", "batch_size", "window"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.resample_rounds < 0 or not 0.0 <= self.overlap < 1.0:
            raise ConfigError(
                f"resample_rounds={self.resample_rounds}, overlap={self.overlap}: expected rounds >= 0 and "
                "overlap in [0, 1)"
            )
        lo, hi = self.guidance_interval = tuple(float(v) for v in self.guidance_interval)  # type: ignore[assignment]
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"guidance interval ({lo:g}, {hi:g}): expected 0 <= low <= high <= 1")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"guidance rescale {self.guidance_rescale:g}: expected a number in [0, 1]")

    def check_models(self, *runs: Any) -> None:
        """Refuse, before any sampling, a time grid that a run's schedule cannot take (runs may be None)."""
        for run in runs:
            if run is not None:
                grid_for(run.model, 1, self.grid)

    def to_dict(self) -> dict:
        return asdict(self)

    def guidance_kwargs(self) -> dict[str, Any]:
        return {"guidance": self.guidance, "guidance_interval": self.guidance_interval,
                "guidance_rescale": self.guidance_rescale}  # fmt: skip


def synthesize(
    base, sr, prompts: Sequence[str], seeds: Sequence[int], options: SampleOptions,
    fixed: FixedChannels | None = None, callback: Callable | None = None,
) -> torch.Tensor:  # fmt: skip
    """Base sample with CFG (and SR when `sr` is given) for one batch; (B, 4, *S) float32 on the CPU
    (lobes as levels; bits runs give those of the nearest valid codes).

    base, sr: `medsyn.generation.run.LoadedRun`s. `fixed` lies on the output grid (SR's when `sr` is given).
    callback: the samplers' `callback(i, t, x, x0)`, called once per step of each stage (progress).
    """
    factor = base.factor if sr is not None else 1
    hold = (fixed.encoded(factor), fixed.index) if fixed is not None else None
    with autocast(base.model.device, options.precision):
        x = generate_base(
            base.model, prompts, seeds, base.grid.shape, steps=options.steps, sampler=options.sampler,
            grid=options.grid, hold=hold, resample_rounds=options.resample_rounds, callback=callback,
            **options.guidance_kwargs(),
        ).float()  # fmt: skip
    if sr is None:
        return x.float().cpu()
    lowres = sr.model.conditioners["lowres"].upsample(x, base.factor)  # (B, 4, *S_hr), as the SR run trained
    hold = (fixed.encoded(1), fixed.index) if fixed is not None else None
    window = options.window if options.sr_mode == "window" else None
    sr_seeds = [int(s) + SR_SEED_OFFSET for s in seeds]
    with autocast(sr.model.device, options.precision):
        x = generate_sr(
            sr.model, lowres, sr_seeds, options.lowres_noise, steps=options.sr_steps, sampler=options.sampler,
            grid=options.grid, hold=hold, resample_rounds=options.resample_rounds, window=window,
            overlap=options.overlap, callback=callback,
        )  # fmt: skip
    return x.float().cpu()
