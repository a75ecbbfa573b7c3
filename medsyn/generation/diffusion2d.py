"""Radiographs from the 2-D diffusion baseline (`train.py cxr-diffusion`): reports -> (N, 1, S, S) images.

The model is built by the builder training used (`build_diffusion_model`) from the run config stored in
the run's `model.safetensors` (EMA weights), and sampled by the CT base stage's `generate_base` with the
project's defaults: DPM-Solver++(2M), `DEFAULT_STEPS` steps, classifier-free guidance 3. Each sample is
drawn from its own seeded generator, so it never depends on the batch it was drawn in. `sample.py --cxr
RUN` calls `sample_images` for runs of this stage and writes the images.

It lives with generation, not with `medsyn.radiograph`: it builds on `medsyn.generation`, which sits above
the radiograph data in the layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsyn.conditioning.text import looks_like_path
from medsyn.errors import ConfigError, DataError
from medsyn.generation.model import DiffusionModel
from medsyn.generation.run import find_run_path, model_from_export
from medsyn.generation.stages import DEFAULT_STEPS, SampleOptions, generate_base
from medsyn.radiograph.cache import ENCODING
from medsyn.weights import WEIGHTS_FILE, load_weights, sha256_file

STAGE = "cxr-diffusion"
SAMPLER = SampleOptions.sampler  # the project's default sampler (dpmpp-2m)
GUIDANCE = SampleOptions.guidance  # and guidance scale (3)


@dataclass
class RadiographRun:
    """A cxr-diffusion run ready to sample: its `model` (EMA weights, eval mode) and the image side `size`."""

    run_dir: Path
    config: dict
    model: DiffusionModel
    weights: Path
    sha256: str
    size: int


def _resolve_text_model(config: dict, run_dir: Path, log: Callable[[str], None]) -> None:
    """Point a stored relative `text.model` at the directory it names (from here or the run directory's
    parents, as `medsyn.generation.run.load_run` does); never run code the weights file names."""
    text = config.get("text")
    if not isinstance(text, dict) or not isinstance(text.get("model"), str):
        return
    if text.get("trust_remote_code"):
        log(f"{run_dir / WEIGHTS_FILE}: ignoring text.trust_remote_code=true from the stored run config")
    text["trust_remote_code"] = False
    found = find_run_path(text["model"], run_dir)
    if found is not None:
        text["model"] = str(found)
    elif looks_like_path(text["model"]):
        raise DataError(
            f"{run_dir}: text model directory {text['model']!r} (text.model in the stored run config) not "
            "found from the current directory, the run directory or its parents; expected the text model "
            "the run was trained with there"
        )


def load_cxr_diffusion(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu", log: Callable[[str], None] = print
) -> RadiographRun:
    """The model of a cxr-diffusion run directory on `device`, from its `model.safetensors` alone."""
    run_dir = Path(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    if not weights.is_file():
        raise DataError(f"{run_dir}: not a trained run (no {WEIGHTS_FILE}); train it with train.py {STAGE}")
    state, config = load_weights(weights)
    if config.get("stage") != STAGE:
        raise DataError(f"{weights}: a {config.get('stage')!r} run; expected a {STAGE} run here")
    if config.get("encoding") != ENCODING:
        raise DataError(f"{weights}: trained on {config.get('encoding')!r} data; expected {ENCODING!r}")
    size = (config.get("data") or {}).get("size")
    if not isinstance(size, int) or size < 1:
        raise DataError(f"{weights}: the stored run config has data.size={size!r}; expected the image side")
    _resolve_text_model(config, run_dir, log)
    model = model_from_export(config, state, weights, run_dir, device)
    return RadiographRun(run_dir, config, model, weights, sha256_file(weights), size)


def sample_images(
    run_dir: str | os.PathLike | RadiographRun,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Radiographs (N, 1, S, S) in [-1, 1] on the CPU, one per (prompt, seed), and their provenance
    {run_dir, weights, sha256, stage, global_step, sampler, steps, guidance, size}.

    steps: sampler steps (None: `DEFAULT_STEPS`); guidance: classifier-free guidance scale (None: 3);
    batch_size: samples per forward pass (the images do not depend on it).
    run_dir may also be a run `load_cxr_diffusion` loaded already (then `device` is the run's).
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or len(prompts) != len(seeds):
        raise ConfigError(f"got {len(prompts)} prompts and {len(seeds)} seeds; expected one seed per prompt")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    guidance = GUIDANCE if guidance is None else float(guidance)
    if steps < 1 or int(batch_size) < 1:
        raise ConfigError(f"steps={steps}, batch_size={batch_size}: expected positive integers")
    run = run_dir if isinstance(run_dir, RadiographRun) else load_cxr_diffusion(run_dir, device)
    images = []
    for start in range(0, len(prompts), int(batch_size)):
        part = slice(start, start + int(batch_size))
        x = generate_base(run.model, prompts[part], seeds[part], (run.size, run.size), steps=steps,
                          sampler=SAMPLER, guidance=guidance)  # fmt: skip
        images.append(x.float().clamp(-1.0, 1.0).cpu())  # (b, 1, S, S)
    provenance = {
        "run_dir": str(run.run_dir),
        "weights": str(run.weights),
        "sha256": run.sha256,
        "stage": STAGE,
        "global_step": run.config.get("global_step"),
        "sampler": SAMPLER,
        "steps": steps,
        "guidance": guidance,
        "size": run.size,
    }
    return torch.cat(images), provenance
