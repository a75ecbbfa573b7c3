"""The files of `medsyn align-map`: per word a similarity map on the volume's own grid and its preview,
a summary of all words and align_map.json.

    <index>_<word>.nii.gz  the word's similarity with each patch, trilinearly upsampled to the input CT's
                           grid (float32, the CT's affine, so it overlays in 3D Slicer or ITK-SNAP; NaN
                           where the align grid did not reach)
    <index>_<word>.png     axial, coronal and sagittal slices through that voxel, CT under a
                           semi-transparent heat overlay, the voxel circled
    summary.png            all words' previews in one grid
    align_map.json         the text; per word its best patch (the maximum similarity) and the voxel at
                           that patch's centre in the input's voxel and world coordinates (the map's
                           maximum: trilinear values never exceed it); the pair's scores; the align
                           run's weights and sha256; the files

Everything is written into a temporary folder beside --out first; an empty or missing --out is then
replaced by it in one rename. A folder holding other files is refused unless `overwrite`, and then only
the files of an earlier align map (as its align_map.json lists them) are replaced; align_map.json, the
record, moves in last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medsyn.alignment.maps import WordMaps, align_grid, upsample_maps
from medsyn.alignment.run import AlignRun
from medsyn.data.grid import Grid
from medsyn.data.nifti import save_nifti
from medsyn.errors import DataError
from medsyn.io import make_temp_dir, write_json
from medsyn.viz import preview_grid, render_heat, save_png

MAP_JSON = "align_map.json"
SUMMARY = "summary.png"
LABEL = "word-patch cosine similarity"


def safe_stem(index: int, word: str, width: int = 2) -> str:
    """`<index>_<word>` as a portable file name: ASCII letters, digits and dashes, at most 40 of them."""
    ascii_word = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9-]+", "_", ascii_word).strip("_-")[:40] or "word"
    return f"{index:0{width}d}_{name}"


def _earlier_files(out: Path) -> list[str] | None:
    """The files an earlier align map in `out` wrote (plain names in it), or None when there is none."""
    try:
        listed = json.loads((out / MAP_JSON).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(listed, list):
        return None
    return [str(n) for n in listed if isinstance(n, str) and Path(n).name == n and n not in ("", ".", "..")]


def check_map_out(out_dir: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Refuse a non-empty --out unless `overwrite`; return the files of an earlier align map in it, which
    are the only ones a new map may replace or remove."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    earlier = _earlier_files(out)
    if not overwrite:
        if earlier is not None:
            raise DataError(f"--out {out}: already holds an align map ({MAP_JSON}); choose another folder or pass "
                            "--overwrite to replace its files")  # fmt: skip
        raise DataError(f"--out {out}: is not empty and holds no align map; choose an empty folder or pass "
                        "--overwrite to write the maps beside its files (which are left alone)")  # fmt: skip
    return [*(earlier or []), MAP_JSON] if earlier is not None else []


def _publish(tmp: Path, out: Path, files: list[str], earlier: list[str]) -> None:
    """Move the finished maps in `tmp` to `out`: one rename onto a missing or empty folder, else file by
    file (an earlier map's files that the new one lacks are removed first, align_map.json moved last)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
        return
    (out / MAP_JSON).unlink(missing_ok=True)  # the record goes first: a crash leaves no claim of a whole map
    for name in set(earlier) - set(files):
        (out / name).unlink(missing_ok=True)
    for name in sorted(files, key=lambda n: n == MAP_JSON):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)


def _grid_record(hr_grid: Grid, factor: int, maps: WordMaps, run: AlignRun) -> dict:
    return {"high_resolution": hr_grid.to_dict(), "factor": factor,
            "base_shape": list(hr_grid.coarsen(factor).shape), "patch_size": run.patch_size,
            "patch_grid": list(maps.geometry.grid), "input": maps.how}  # fmt: skip


def write_align_map(
    maps: WordMaps,
    run: AlignRun,
    hu: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    source: str,
    overwrite: bool = False,
    panel: int = 200,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the word maps of `maps` on the grid of the CT `hu` (I, J, K, HU) with `affine` into `out_dir`
    (see the module docstring); `source` names the volume in the previews and align_map.json."""
    out = Path(out_dir)
    earlier = check_map_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(affine, np.float64)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        width = max(2, len(str(len(maps.words) - 1)))
        records, images, captions = [], [], []
        for w, word in enumerate(maps.words):
            stem = safe_stem(w, word, width)
            heat = upsample_maps(maps.similarity[w : w + 1], maps.geometry, tuple(hu.shape), affine)[0]
            save_nifti(tmp / f"{stem}.nii.gz", heat, affine, np.float32)
            best = int(maps.similarity[w].argmax())  # the word's best patch, and the voxel at its centre
            centre = maps.geometry.centre(best)
            voxel = np.clip(np.rint(np.linalg.solve(affine, [*centre, 1.0])[:3]), 0, np.asarray(hu.shape) - 1)
            voxel = tuple(int(v) for v in voxel)
            top = float(maps.similarity[w, best])
            image = render_heat(hu, heat, affine, title=f"{w}: {word!r} in {source}", label=LABEL, mark=voxel,
                                panel=panel)  # fmt: skip
            save_png(tmp / f"{stem}.png", image)
            images.append(image)
            captions.append(f"{w}: {word} (max {top:.3f})")
            records.append({
                "index": w, "word": word, "map": f"{stem}.nii.gz", "preview": f"{stem}.png",
                "max_similarity": top,
                "patch": {"index": best, "centre_world_mm": centre.round(3).tolist()},
                "voxel": list(voxel), "world_mm": (affine @ [*voxel, 1.0])[:3].round(3).tolist(),
                "map_value": float(heat[voxel]),
            })  # fmt: skip
        save_png(tmp / SUMMARY, preview_grid(images, captions, ncols=min(3, len(images))))
        files = sorted(p.name for p in tmp.iterdir()) + [MAP_JSON]
        write_json(tmp / MAP_JSON, {
            "text": maps.text, "volume": {"source": source, "shape": list(hu.shape), "affine": affine.tolist()},
            "align_run": {"run_dir": str(run.run_dir), "weights": str(run.weights), "sha256": run.sha256},
            "align_grid": _grid_record(*align_grid(run), maps, run), "scores": maps.scores,
            "interpolation": "trilinear between patch centres at their world positions; NaN outside the align "
                             "grid's field of view",
            "words": records, "files": files,
        })  # fmt: skip
        _publish(tmp, out, files, earlier)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"medsyn align-map: {len(records)} word map(s), previews, {SUMMARY} and {MAP_JSON} in {out}")
    return out
