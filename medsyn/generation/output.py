"""Writing generated CT samples: OUT/<index>/ per sample, each written whole as it finishes, with provenance.

    OUT/<index>/{ct,lobes,airway,vessels}.nii.gz, preview.png, meta.json

The folders are made by `medsyn.sample_folders` (the contract: written whole, kept on a rerun of the same
request, replaced only with `overwrite`, nothing else in OUT touched). A CT sample's meta.json records the
request that made it: prompt, seed, options, fixed channels, grid and the weights' (and keypatch
codebooks') sha256.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medsyn.data.channels import decode_volume, encode_lobes
from medsyn.data.grid import Grid
from medsyn.data.nifti import save_nifti
from medsyn.errors import DataError
from medsyn.generation.fixed import FixedChannels
from medsyn.generation.stages import SR_SEED_OFFSET, SampleOptions, synthesize
from medsyn.io import write_json
from medsyn.sample_folders import IGNORED_OPTIONS, INDEX, SampleKind, write_samples
from medsyn.sample_folders import package_versions as versions_of
from medsyn.viz import render_volume, save_png

SAMPLE_FILES = ("ct.nii.gz", "lobes.nii.gz", "airway.nii.gz", "vessels.nii.gz", "preview.png", "meta.json")


def package_versions() -> dict[str, str]:
    """Versions of the packages a CT sample depends on (provenance in meta.json)."""
    return versions_of(("medsyn", "torch", "monai", "numpy", "nibabel", "transformers", "safetensors"))


def write_sample(directory: Path, x: torch.Tensor, grid: Grid, meta: dict) -> None:
    """Write one sample (4, *S) in the diffusion range as the design's files into `directory`.

    Generated lobes are decoded with the lungs in mind (`medsyn.data.channels.decode_lobes_clean`), fixed
    ones (`meta["fixed"]`) exactly as given; the preview shows the lobes as written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    arrays = decode_volume(x.numpy(), clean="lobes" not in meta["fixed"])
    for name, array in arrays.items():
        save_nifti(directory / f"{name}.nii.gz", array, grid.affine, dtype=array.dtype)
    title = f"seed {meta['seed']}: {meta['prompt']}"
    shown = x.clone()
    shown[1] = torch.from_numpy(encode_lobes(arrays["lobes"]))
    save_png(directory / "preview.png", render_volume(shown, spacing=grid.affine, title=title))
    write_json(directory / "meta.json", meta)


def request_of(meta: dict) -> dict[str, Any]:
    """What made a CT sample, from its meta.json: the fields a rerun must match for the sample to be kept."""
    return {
        "index": meta["index"], "prompt": meta["prompt"], "seed": meta["seed"],
        "options": {k: v for k, v in meta["options"].items() if k not in IGNORED_OPTIONS},
        "fixed": {name: src["sha256"] for name, src in meta["fixed"].items()},
        "weights": {stage: w["sha256"] for stage, w in meta["weights"].items()},
        "keypatches": {stage: w["keypatches"]["codebook_sha256"] for stage, w in meta["weights"].items()
                       if "keypatches" in w},
        "grid": {k: v for k, v in meta["grid"].items() if k != "source"},  # not where it was read from
    }  # fmt: skip


def _old_unfinished(out_dir: Path) -> list[Path]:
    """The temporary OUTs that earlier versions wrote beside OUT (`.OUT.xxxxxxxx.tmp`) and a killed run
    left: nothing in them but sample folders holding sample files (or their temporary names)."""
    if not out_dir.name or not out_dir.parent.is_dir():
        return []
    return [p for p in out_dir.parent.iterdir() if _old_temporary_out(p, out_dir)]


def _old_temporary_out(path: Path, out_dir: Path) -> bool:
    if not re.fullmatch(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}\.tmp", path.name):
        return False
    if not path.is_dir() or path.is_symlink():
        return False
    for sample in path.iterdir():
        if not INDEX.fullmatch(sample.name) or not sample.is_dir() or sample.is_symlink():
            return False
        if any(f.name not in SAMPLE_FILES and not f.name.startswith(".") for f in sample.iterdir()):
            return False
    return True


CT_SAMPLES = SampleKind(request_of, example="out/samples", leftovers=_old_unfinished)


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output directory medsyn must not write CT samples into (`SampleKind.check_out_dir`)."""
    CT_SAMPLES.check_out_dir(out_dir, overwrite)


def clean_unfinished(out_dir: Path) -> int:
    """Remove the temporary sample folders an interrupted run left in `out_dir` (and, from older
    versions, beside it); returns how many. Nothing else is touched."""
    return CT_SAMPLES.clean_unfinished(out_dir)


def check_requests(requests: Sequence[tuple[str, int]]) -> None:
    """Refuse an empty request list or an empty prompt."""
    if not requests:
        raise DataError("no samples requested; give at least one prompt")
    for index, (prompt, _) in enumerate(requests):
        if not str(prompt).strip():
            raise DataError(
                f"prompt of sample {index} is empty; expected a report text (for unconditional samples "
                "give any prompt with guidance 0)"
            )


def run_sampling(
    base, sr, requests: Sequence[tuple[str, int]], options: SampleOptions, out_dir: str | Path,
    fixed: FixedChannels | None = None, overwrite: bool = False, log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> Path:  # fmt: skip
    """Sample every (prompt, seed) request in batches and write `out_dir/<index>/`, each as it finishes.

    Samples already in `out_dir` from the same request are kept; medsyn sample folders of another
    request are refused unless `overwrite` (then replaced); nothing else in `out_dir` is touched (see
    `check_out_dir`). progress: tqdm bars on stderr over samples and sampler steps (None: on a terminal).
    """
    check_requests(requests)
    check_out_dir(out_dir, overwrite)
    if sr is not None and tuple(sr.grid.shape) != tuple(s * base.factor for s in base.grid.shape):
        raise DataError(
            f"{sr.run_dir}: SR grid {list(sr.grid.shape)} is not {base.factor}x the base grid "
            f"{list(base.grid.shape)} of {base.run_dir}; expected runs trained on the same cache"
        )
    if sr is not None and options.lowres_noise is not None:
        sr.model.conditioners["lowres"].check_level(options.lowres_noise, "--sr-noise")
    grid = sr.grid if sr is not None else base.grid
    common = {
        "sampler": options.sampler, "steps": options.steps, "guidance": options.guidance,
        "options": options.to_dict(), "fixed": fixed.meta() if fixed is not None else {},
        "weights": {"base": base.provenance(), **({"sr": sr.provenance()} if sr is not None else {})},
        "versions": package_versions(),
        "grid": {**grid.to_dict(), "stage": "sr" if sr is not None else "base"},
        "base_grid": base.grid.to_dict(),
        "device": str(base.model.device),
    }  # fmt: skip
    metas = [{"index": i, "prompt": p, "seed": s, **common} for i, (p, s) in enumerate(requests)]
    if sr is not None:
        for meta in metas:
            meta["sr_seed"] = meta["seed"] + SR_SEED_OFFSET
    steps = options.steps + (options.sr_steps if sr is not None else 0)

    def make(batch: list[dict], step: Callable[..., None]) -> torch.Tensor:
        return synthesize(base, sr, [m["prompt"] for m in batch], [m["seed"] for m in batch], options, fixed,
                          callback=step)  # fmt: skip

    def write(directory: Path, x: torch.Tensor, meta: dict) -> None:
        write_sample(directory, x, grid, meta)

    return write_samples(CT_SAMPLES, out_dir, metas, make, write, options.batch_size, overwrite, steps,
                         detail=f", {list(grid.shape)} at {grid.spacing[0]:g} mm", log=log,
                         progress=progress)  # fmt: skip
