"""Generate phantom chest CTs (volume, masks, report, ground truth) and write them as a dataset.

A phantom's anatomy and pathology are defined in millimetres, so the same seed gives the same chest
at 32^3, 64^3 or 256^3 (the field of view is 256 mm unless `spacing_mm` says otherwise). Subject i of
a dataset with seed s is `generate_phantom(size, spacing_mm, seed=[s, i])`; its `SeedSequence([s, i])`
spawns separate streams for anatomy, pathology, report wording and noise. Subjects therefore do not
depend on how many there are or on which worker made them, and datasets with seeds s and s + 1 do
not share subjects.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsyn.data.channels import LOBE_NAMES
from medsyn.data.nifti import save_nifti, spacing_affine
from medsyn.data.phantom.anatomy import sample_anatomy
from medsyn.data.phantom.geometry import Grid
from medsyn.data.phantom.pathology import (
    FindingRegions,
    PathologyParams,
    apply_pathology,
    measure,
    sample_pathology,
)
from medsyn.data.phantom.render import draw_anatomy, finish_ct
from medsyn.data.phantom.report import Report, write_report
from medsyn.data.phantom.trees import build_trees, mediastinal_tubes, rib_tubes
from medsyn.errors import DataError, MedsynError
from medsyn.io import atomic_dir, atomic_path, write_json, write_text

FOV_MM = 256.0
MANIFEST_COLUMNS = ("id", "ct", "lobes", "airway", "vessels", "findings", "impression")
# how the measured quantities in truth.json are defined, so that an evaluation of generated volumes can
# measure them the same way
DEFINITIONS = {
    "effusion_ml": "pleural fluid voxels x voxel volume (fluid replaces lung; lobes are 0 there)",
    "ctr": "widest axial x-extent of the heart / widest axial x-extent of the inner bony thorax",
    "laa950_percent": "100 x fraction of lung voxels (lobes > 0) outside the airway lumen below -950 HU",
    "lung_volume_ml": "voxels with lobes > 0 x voxel volume",
    "center_mm": "lesion centre in world RAS+ mm (the NIfTI affine's space)",
}


@dataclass
class Phantom:
    """One phantom chest CT: volumes on a RAS grid, its report, its ground truth and where each finding
    lies (`regions`, not written by `save_phantom`: `phantom_from_truth` draws it again)."""

    ct: np.ndarray  # (S, S, S) int16 HU
    lobes: np.ndarray  # uint8 0..5
    airway: np.ndarray  # uint8 0/1
    vessels: np.ndarray  # uint8 0/1
    affine: np.ndarray  # (4, 4) RAS, spacing in mm
    report: Report
    truth: dict
    regions: FindingRegions


def generate_phantom(
    size: int = 64,
    spacing_mm: float | None = None,
    seed: int | list[int] = 0,
    params: PathologyParams | None = None,
    noise_hu: float = 15.0,
) -> Phantom:
    """A phantom chest CT of `size`^3 voxels (default spacing: 256 mm / size).

    `params` sets the pathology; by default it is sampled from the seed. The same seed gives the same
    anatomy whatever `params` are, so a prompt pair (with / without a finding) shares one body.
    """
    if size < 8:
        raise ValueError(f"size={size}: phantoms need at least 8 voxels per axis")
    spacing = float(spacing_mm) if spacing_mm is not None else FOV_MM / size
    if spacing <= 0:
        raise ValueError(f"spacing_mm={spacing_mm}: expected a positive spacing")
    anatomy_rng, pathology_rng, report_rng, noise_rng = (np.random.default_rng(s) for s in
                                                         np.random.SeedSequence(seed).spawn(4))  # fmt: skip
    sampled = sample_pathology(pathology_rng)
    params = params if params is not None else sampled
    anat = sample_anatomy(anatomy_rng, params.ctr)
    grid = Grid(size, spacing)
    central = mediastinal_tubes(anat)
    tubes = {**central, **build_trees(anat, anatomy_rng, central)}
    tubes["ribs"], tubes["cartilage"] = rib_tubes(anat)
    drawn = draw_anatomy(anat, grid, tubes)
    lobes = drawn.lobes
    placed = apply_pathology(drawn, lobes, anat, grid, params, pathology_rng)
    ct = finish_ct(drawn.hu, grid, noise_rng, noise_hu)
    truth = {
        "seed": seed if isinstance(seed, int) else list(seed),
        "size": size,
        "spacing_mm": spacing,
        "params": params.to_dict(),
        "findings": {
            "effusion": params.effusion,
            "effusion_side": params.effusion_side if params.effusion != "none" else None,
            "cardiomegaly": params.cardiomegaly,
            "emphysema_lobe": LOBE_NAMES.get(params.emphysema_lobe),
            "bullae": params.bullae,
            "consolidation": [LOBE_NAMES[i] for i in params.consolidation],
            "ground_glass": [LOBE_NAMES[i] for i in params.ground_glass],
        },
        "lesions": placed["lesions"],
        "definitions": DEFINITIONS,
        **measure(ct, lobes, drawn.airway, drawn.heart, drawn.cavity, placed["fluid"], grid),
    }
    return Phantom(
        ct=ct,
        lobes=lobes.astype(np.uint8),
        airway=drawn.airway.astype(np.uint8),
        vessels=drawn.vessels.astype(np.uint8),
        affine=spacing_affine(spacing, grid.shape),
        report=write_report(params, report_rng),
        truth=truth,
        regions=placed["regions"],
    )


def phantom_from_truth(truth: dict, where: str | os.PathLike = "truth.json") -> Phantom:
    """The phantom a `truth.json` describes, drawn again from its seed, size, spacing and params (for its
    `regions`, which are not saved). A truth this code no longer reproduces (other lesion placement or
    effusion volume: the phantom code changed since it was written) is a `DataError` naming `where`."""
    try:
        size, spacing, seed = int(truth["size"]), float(truth["spacing_mm"]), truth["seed"]
        params = PathologyParams(**truth["params"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: not a phantom truth (seed, size, spacing_mm, params): {err}") from err
    phantom = generate_phantom(size, spacing, seed, params)
    again = phantom.truth
    if again["lesions"] != truth.get("lesions") or again["effusion_ml"] != truth.get("effusion_ml"):
        raise DataError(
            f"{where}: this version of the phantom code draws seed {seed} differently (lesions or effusion "
            "volume differ from the file); regenerate the phantoms with `medsyn phantom`"
        )
    return phantom


def phantom_report(seed: int | list[int]) -> Report:
    """The report of the phantom `generate_phantom(..., seed=seed)` makes, without drawing its volume
    (the same random streams), for text models that need reports only."""
    _, pathology_rng, report_rng, _ = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    return write_report(sample_pathology(pathology_rng), report_rng)


def write_reports(path: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """A CSV (id, findings, impression) of the reports of the `n` phantoms `write_dataset(..., seed=seed)`
    would write; seconds for thousands of subjects."""
    path = Path(path)
    if n < 1:
        raise MedsynError(f"n={n}: expected at least one report")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "findings", "impression"])
        writer.writeheader()
        for i in range(n):
            report = phantom_report([seed, i])
            writer.writerow(
                {"id": f"phantom_{i:04d}", "findings": report.findings, "impression": report.impression}
            )
    return path


def save_phantom(directory: str | os.PathLike, phantom: Phantom) -> None:
    """Write one phantom's files into `directory` (NIfTI volumes, report.txt, truth.json)."""
    directory = Path(directory)
    save_nifti(directory / "ct.nii.gz", phantom.ct, phantom.affine, np.int16)
    for name in ("lobes", "airway", "vessels"):
        save_nifti(directory / f"{name}.nii.gz", getattr(phantom, name), phantom.affine, np.uint8)
    write_text(directory / "report.txt", phantom.report.text())
    write_json(directory / "truth.json", phantom.truth)


def _make_one(args: tuple[Path, str, int, float | None, list[int], bool]) -> dict:
    out, subject_id, size, spacing, seed, overwrite = args
    phantom = generate_phantom(size, spacing, seed)
    with atomic_dir(out / subject_id, overwrite=overwrite) as tmp:
        save_phantom(tmp, phantom)
    return {"id": subject_id, "ct": f"{subject_id}/ct.nii.gz", "lobes": f"{subject_id}/lobes.nii.gz",
            "airway": f"{subject_id}/airway.nii.gz", "vessels": f"{subject_id}/vessels.nii.gz",
            "findings": phantom.report.findings, "impression": phantom.report.impression}  # fmt: skip


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 64,
    spacing_mm: float | None = None,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `n` phantoms to `out_dir/<id>/` and `out_dir/manifest.csv` (the generic manifest format).

    A non-empty `out_dir` is refused unless `overwrite`; every subject directory and the manifest
    appear atomically, so an interrupted run leaves only whole subjects.
    """
    out = Path(out_dir)
    if n < 1:
        raise MedsynError(f"--n {n}: expected at least one phantom")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedsynError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # with --overwrite, phantoms of a larger earlier run would linger
        match = re.fullmatch(r"phantom_(\d+)", old.name)
        if match and old.is_dir() and int(match.group(1)) >= n:
            shutil.rmtree(old)
    jobs = [(out, f"phantom_{i:04d}", size, spacing_mm, [seed, i], overwrite) for i in range(n)]
    bar = tqdm(total=n, desc="phantoms", unit="subject", disable=not progress)
    rows: list[dict] = []
    if workers <= 1 or n == 1:
        for job in jobs:
            rows.append(_make_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(min(workers, n)) as pool:
            for row in pool.map(_make_one, jobs):
                rows.append(row)
                bar.update()
    bar.close()
    with atomic_path(out / "manifest.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return out
