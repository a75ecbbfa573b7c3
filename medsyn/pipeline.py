"""Generation from trained parts: the base stage from prompts, the SR stage from a low-resolution volume,
and the two together as `sample.py` runs them, with fixed channels and files written per sample.

Used by the training previews and by `sample.py`. Everything is seeded per sample: sample i
depends only on seeds[i], never on how samples were batched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medsyn.diffusion import ClassifierFreeGuidance, randn_per_sample, sample, time_grid
from medsyn.marginal import FixedChannels, HoldFixed, sample_resampled

Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Hold = tuple[torch.Tensor, Sequence[int]]  # encoded fixed channels (1 | B, k, *S) and their indices
SR_SEED_OFFSET = 1 << 40  # the SR stage of sample i draws from seed_i + offset: noise unrelated to the base's
SR_MODES = ("full", "window")


def generators_for(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, on `device`."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _run(sampler, denoise, noise, ts, schedule, gens, project, callback, hold, rounds) -> torch.Tensor:
    """Shared tail of both stages: hold fixed channels (also in the initial noise), then sample."""
    if hold is not None:
        project = HoldFixed(hold[0], hold[1], schedule, gens)
        noise = project(noise, ts[:1].expand(noise.shape[0]))
    if rounds > 0:
        return sample_resampled(sampler, denoise, noise, ts, schedule, gens, project, rounds)
    return sample(sampler, denoise, noise, ts, schedule, generators=gens, callback=callback, project=project)


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
    hold: Hold | None = None,
    resample_rounds: int = 0,
) -> torch.Tensor:
    """Sample base volumes (B, C, *shape) for `prompts` (one seed each) with classifier-free guidance.

    hold: fixed channels to keep at every step (marginalized sampling); resample_rounds: RePaint rounds.
    """
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
    return _run(
        sampler, denoise, noise, ts, denoiser.schedule, gens, project, callback, hold, resample_rounds
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
    hold: Hold | None = None,
    resample_rounds: int = 0,
    window: int | None = None,
    overlap: float = 0.2,
) -> torch.Tensor:
    """Sample high-resolution volumes given `lowres` (B, C, *S) already upsampled to the target grid.

    window: evaluate the network on windows of this size blended with `overlap` (bounded memory,
    see `medsyn.sliding`); None runs it on the full volume.
    """
    device = next(denoiser.parameters()).device
    lowres = lowres.to(device)
    gens = generators_for(seeds, device)
    b = lowres.shape[0]
    noise = randn_per_sample((b, denoiser.net.out_channels, *lowres.shape[2:]), gens, device=device)
    aug_t = torch.full((b,), float(lowres_noise), device=device)
    aug_noise = randn_per_sample(lowres.shape, gens, device=device)
    cond = {"concat": denoiser.schedule.add_noise(lowres, aug_t, aug_noise), "aug_t": aug_t}

    if window is not None:
        from medsyn.sliding import windowed_denoiser

        denoise = windowed_denoiser(denoiser, cond, window, overlap)
    else:

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return denoiser(x, t, **cond)

    ts = time_grid(steps, grid, denoiser.schedule).to(device)
    return _run(
        sampler, denoise, noise, ts, denoiser.schedule, gens, project, callback, hold, resample_rounds
    )


@dataclass
class SampleOptions:
    """How `synthesize` samples; defaults cost about 0.24 PFLOP per 256^3 sample at paper scale."""

    steps: int = 25
    sr_steps: int = 10
    sampler: str = "dpmpp-2m"
    guidance: float = 3.0
    grid: str = "logsnr"
    resample_rounds: int = 0
    sr_mode: str = "full"
    window: int = 144
    overlap: float = 0.2
    batch_size: int = 1

    def __post_init__(self) -> None:
        from medsyn.diffusion import SAMPLERS
        from medsyn.errors import ConfigError

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

    def to_dict(self) -> dict:
        return asdict(self)


def synthesize(
    base, sr, prompts: Sequence[str], seeds: Sequence[int], options: SampleOptions,
    fixed: FixedChannels | None = None,
) -> torch.Tensor:  # fmt: skip
    """Base sample with CFG (and SR when `sr` is given) for one batch; (B, 4, *S) float32 on the CPU.

    base, sr: `medsyn.inference.LoadedRun`s. `fixed` lies on the output grid (SR's when `sr` is given).
    """
    from medsyn.data.datamodule import upsample

    factor = base.factor if sr is not None else 1
    hold = (fixed.encoded(factor), fixed.index) if fixed is not None else None
    x = generate_base(
        base.denoiser, base.text, prompts, seeds, base.grid.shape, options.steps, options.sampler,
        options.guidance, options.grid, hold=hold, resample_rounds=options.resample_rounds,
    )  # fmt: skip
    if sr is None:
        return x.float().cpu()
    lowres = torch.stack([upsample(v, base.factor) for v in x])  # (B, 4, *S_hr), nearest
    hold = (fixed.encoded(1), fixed.index) if fixed is not None else None
    window = options.window if options.sr_mode == "window" else None
    sr_seeds = [int(s) + SR_SEED_OFFSET for s in seeds]
    x = generate_sr(
        sr.denoiser, lowres, sr_seeds, options.sr_steps, options.sampler, sr.lowres_noise, options.grid,
        hold=hold, resample_rounds=options.resample_rounds, window=window, overlap=options.overlap,
    )  # fmt: skip
    return x.float().cpu()


def write_sample(directory: Path, x: torch.Tensor, grid, meta: dict) -> None:
    """Write one sample (4, *S) in the diffusion range as the design's files into `directory`."""
    from medsyn.data.channels import decode_volume
    from medsyn.data.nifti import save_nifti
    from medsyn.io import write_json
    from medsyn.viz import render_volume, save_png

    directory.mkdir(parents=True, exist_ok=True)
    arrays = decode_volume(x.numpy())
    for name, array in arrays.items():
        save_nifti(directory / f"{name}.nii.gz", array, grid.affine, dtype=array.dtype)
    title = f"seed {meta['seed']}: {meta['prompt']}"
    save_png(directory / "preview.png", render_volume(x, spacing=grid.affine, title=title))
    write_json(directory / "meta.json", meta)


def run_sampling(
    base, sr, requests: Sequence[tuple[str, int]], options: SampleOptions, out_dir: str | Path,
    fixed: FixedChannels | None = None, overwrite: bool = False, log: Callable[[str], None] = print,
) -> Path:  # fmt: skip
    """Sample every (prompt, seed) request in batches and write `out_dir/<index>/` atomically.

    An existing non-empty `out_dir` is refused (before any work) unless `overwrite`.
    """
    from medsyn.errors import DataError
    from medsyn.inference import package_versions
    from medsyn.io import atomic_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
    if sr is not None and tuple(sr.grid.shape) != tuple(s * base.factor for s in base.grid.shape):
        raise DataError(
            f"{sr.run_dir}: SR grid {list(sr.grid.shape)} is not {base.factor}x the base grid "
            f"{list(base.grid.shape)} of {base.run_dir}; expected runs trained on the same cache"
        )
    grid = sr.grid if sr is not None else base.grid
    common = {
        "sampler": options.sampler, "steps": options.steps, "guidance": options.guidance,
        "options": options.to_dict(), "fixed": fixed.meta() if fixed is not None else {},
        "weights": {"base": base.provenance(), **({"sr": sr.provenance()} if sr is not None else {})},
        "versions": package_versions(),
        "grid": {**grid.to_dict(), "stage": "sr" if sr is not None else "base"},
        "base_grid": base.grid.to_dict(),
        "device": str(next(base.denoiser.parameters()).device),
    }  # fmt: skip
    with atomic_dir(out_dir, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes 0700; the output is an ordinary directory
        for start in range(0, len(requests), options.batch_size):
            batch = requests[start : start + options.batch_size]
            began = time.perf_counter()
            x = synthesize(base, sr, [p for p, _ in batch], [s for _, s in batch], options, fixed)
            seconds = (time.perf_counter() - began) / len(batch)
            for j, (prompt, seed) in enumerate(batch):
                index = start + j
                meta = {
                    "index": index,
                    "prompt": prompt,
                    "seed": seed,
                    **common,
                    "seconds": round(seconds, 3),
                }
                if sr is not None:
                    meta["sr_seed"] = seed + SR_SEED_OFFSET
                write_sample(tmp / str(index), x[j], grid, meta)
                log(
                    f"sample {index}: seed {seed}, {seconds:.1f} s, {list(grid.shape)} at {grid.spacing[0]:g} mm"
                )
    return out_dir
