"""Load a trained run directory for generation: its config, its EMA weights and the grid it generates on.

A run directory (see the README) holds `config.yaml`, `checkpoints/last.ckpt` and `model.safetensors`;
generation needs only the safetensors file, whose metadata carries the merged run config. The model is
built by the same builder as in training, without any LightningModule. Errors name the run directory or
file and say what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsyn.conditioning.text import looks_like_path
from medsyn.data.channels import ENCODING
from medsyn.data.grid import LR_FACTOR, Grid, run_grid
from medsyn.errors import DataError, MedsynError
from medsyn.generation.model import DiffusionModel, build_diffusion_model, upgrade_config
from medsyn.weights import WEIGHTS_FILE, load_weights, sha256_file


@dataclass
class LoadedRun:
    """A run ready to generate: its `model` (denoiser and conditioners, EMA weights, eval mode), its
    config and the high-resolution grid of its data (`hr_grid`); `grid` is the one it generates on."""

    run_dir: Path
    stage: str
    config: dict
    model: DiffusionModel
    weights: Path
    sha256: str
    hr_grid: Grid
    factor: int = LR_FACTOR

    @property
    def grid(self) -> Grid:
        """The grid this model generates on: the cache's low- or high-resolution grid (`data.resolution`)."""
        return (
            self.hr_grid.coarsen(self.factor) if self.config["data"]["resolution"] == "lr" else self.hr_grid
        )

    def provenance(self) -> dict[str, Any]:
        """Where the model comes from: its weights (sha256), and what a conditioner loads beside them
        (`keypatches`: the align run and codebook, with theirs)."""
        out = {
            "run_dir": str(self.run_dir),
            "weights": str(self.weights),
            "sha256": self.sha256,
            "stage": self.stage,
            "global_step": self.config.get("global_step"),
            "model": self.config.get("model"),
        }
        for key, conditioner in self.model.conditioners.items():
            if hasattr(conditioner, "provenance"):
                out[key] = conditioner.provenance()
        return out


RUN_PARENTS = 3  # levels above a run directory searched for its relative paths: runs/demo/base -> repo root


def find_run_path(value: str, run_dir: Path) -> Path | None:
    """A path stored in a run's config: as it is when it exists from the current directory, else
    relative to the run directory or one of its `RUN_PARENTS` parents (where training ran); None if
    none of them holds it."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path if path.exists() else None
    for where in (Path(os.path.abspath(run_dir)), run_dir.resolve()):  # as given, and with links resolved
        for root in (where, *where.parents[:RUN_PARENTS]):
            if (root / path).exists():
                return root / path
    return None


def _resolve_paths(config: dict, run_dir: Path) -> None:
    """Resolve the relative paths of a stored config (`text.model`, `data.root`, `keypatches.align`,
    `keypatches.codebook`) as `find_run_path` does, so a run directory loads from any working directory.
    A missing text model directory is an error here; a missing align run or codebook, the conditioner's."""
    text, data, keypatches = config.get("text"), config.get("data"), config.get("keypatches")
    for key in ("align", "codebook"):
        if isinstance(keypatches, dict) and isinstance(keypatches.get(key), str):
            found = find_run_path(keypatches[key], run_dir)
            keypatches[key] = str(found) if found is not None else keypatches[key]
    if isinstance(text, dict) and isinstance(text.get("model"), str):
        name = text["model"]
        found = find_run_path(name, run_dir)
        if found is not None:
            text["model"] = str(found)
        elif looks_like_path(name):
            raise DataError(
                f"{run_dir}: text model directory {name!r} (text.model in the stored run config) not found "
                f"from the current directory, nor from the run directory or the {RUN_PARENTS} above it; "
                "expected the text model the run was trained with there"
            )
    if isinstance(data, dict) and isinstance(data.get("root"), str):
        found = find_run_path(data["root"], run_dir)
        if found is not None:
            data["root"] = str(found)


def encoding_problem(config: dict, weights: Path) -> str:
    """'' when a run's stored config records the current channel encoding, else the one-line reason its
    samples would decode wrongly (a run of medsyn-1 records none: lobes as label / 5)."""
    encoding = config.get("encoding")
    if encoding == ENCODING:
        return ""
    found = f"the {encoding!r} channel encoding" if encoding else "the medsyn-1 lobe encoding (label / 5)"
    return (
        f"{weights}: trained with {found}; this medsyn decodes {ENCODING!r} (lobe levels, block-mean base "
        "grid), so its masks would come out wrong; retrain the run on data prepared by this medsyn"
    )


def _distrust(config: dict, weights: Path, log: Callable[[str], None]) -> None:
    """Never run code a weights file names: switch off a stored `text.trust_remote_code`."""
    text = config.get("text")
    if not isinstance(text, dict):
        return
    if text.get("trust_remote_code"):
        log(f"{weights}: ignoring text.trust_remote_code=true from the stored run config (a weights file "
            "never runs code); pass --trust-remote-code to allow it")  # fmt: skip
    text["trust_remote_code"] = False


def model_from_export(
    config: dict, state: dict, weights: Path, run_dir: Path, device: str | torch.device = "cpu"
) -> DiffusionModel:
    """The diffusion model a run's stored config describes, with its exported weights, in eval mode on
    `device`; a config or weights that do not fit give a one-line DataError naming the file."""
    try:
        model = build_diffusion_model(config)
    except KeyError as err:
        raise DataError(f"{weights}: the stored run config lacks {err}") from err
    except MedsynError as err:
        raise DataError(f"{run_dir}: cannot build the run's model from its stored config: {err}") from err
    try:
        model.load_exported_state(state)
    except (KeyError, RuntimeError) as err:
        raise DataError(f"{weights}: weights do not match the run's config ({err})") from err
    return model.to(device).eval().requires_grad_(False)


def load_run(
    run_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    stage: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> LoadedRun:
    """Build the model of `run_dir` from its config and EMA weights, ready to generate on `device`.

    `stage` ("base" / "sr"), when given, must match the run's; so must its channel encoding (a run of an
    earlier encoding is refused: `encoding_problem`). Errors name the directory or file.
    trust_remote_code: honour a stored `text.trust_remote_code` (model code from the text model's
        directory or hub repository); by default it is switched off, with a note through `log`.
    Relative paths in the stored config are found from here or from the run directory's parents.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{run_dir}: not a trained run directory (no {WEIGHTS_FILE}); train it with train.py")
    state, config = load_weights(weights)
    config = upgrade_config(config)
    run_stage = config.get("stage")
    if run_stage not in ("base", "sr"):
        raise DataError(f"{weights}: unknown stage {run_stage!r} in the weights' metadata")
    if stage is not None and run_stage != stage:
        raise DataError(f"{run_dir}: is a '{run_stage}' run, expected a '{stage}' run here")
    if encoding_problem(config, weights):
        raise DataError(encoding_problem(config, weights))
    if not trust_remote_code:
        _distrust(config, weights, log)
    _resolve_paths(config, run_dir)
    model = model_from_export(config, state, weights, run_dir, device)
    hr_grid, factor = run_grid(config)
    return LoadedRun(run_dir, run_stage, config, model, weights, sha256_file(weights), hr_grid, factor)
