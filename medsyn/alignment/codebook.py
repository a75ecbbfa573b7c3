"""The visual codebook of keypatches and their retrieval for a report (the second seed paper's section 2.2,
"Visual Codebook Construction" and "Keypatches Extraction"), for CT volumes (3D) and radiographs (2D).

Construction (`Codebook.build`): embed every (report, image) pair of a cache split with a trained align
run; keep the k1 pairs of highest global report-image similarity; in each, every word's most similar
patch gives a (word, patch, score) candidate (the word-patch maximum similarity); the k2 best-scoring
candidates, ranked over all kept pairs, are the keypatches. A patch chosen by two words of its report is
kept once, under the word that scored it highest. Each keypatch holds its patch feature (D), its pixels
cut from the cache's image ((4, p, p, p) of a CT cache's base-resolution volume, (1, p, p) of a
radiograph), the word, the score, the subject, the patch's grid index and its box ([start, stop) per
axis of that image: 3 axes or 2). `keypatch_crops` gives the pixels of retrieved keypatches.

Retrieval (`Codebook.retrieve`, `keypatch_tokens`): the cosine similarity of a report's words with every
keypatch feature; per word the k3 best keypatches, optionally never any of some subjects' own (so a
subject's report retrieves no patch of its own volume when it trains on them).

On disk (`save` / `load`), in a folder:

    codebook.safetensors  features (K, D) float32, patches (K, C, *p) as the cache's loader gives them
                          (CT: (K, 4, p, p, p) float16; radiographs: (K, 1, p, p) float32)
    codebook.json         format, the align run (path, sha256), cache, split, k1, k2, the kept pairs,
                          one record per keypatch (KEYPATCH_FIELDS) and the sha256 of the tensors file

Each file is written to a temporary name and renamed, the json last; the json records the tensors
file's sha256, so a pair of files from different builds is refused on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from medsyn.alignment.model import Grid, patch_box
from medsyn.errors import ConfigError, DataError
from medsyn.io import atomic_path, usual_mode, write_json
from medsyn.weights import sha256_file

if TYPE_CHECKING:
    from medsyn.alignment.data import PairCache
    from medsyn.alignment.run import AlignRun

FORMAT = "medsyn-codebook-1"
TENSORS_FILE, JSON_FILE, SHEET_FILE = "codebook.safetensors", "codebook.json", "keypatches.png"
CODEBOOK_FILES = (TENSORS_FILE, JSON_FILE, SHEET_FILE)
DEFAULT_K1, DEFAULT_K2, DEFAULT_K3 = 256, 1024, 3
KEYPATCH_FIELDS = (
    "word",
    "word_position",
    "score",
    "subject",
    "pair_rank",
    "pair_similarity",
    "patch_index",
    "box",
)


@dataclass(frozen=True)
class Keypatch:
    """Where a keypatch came from: the word (as written, at `word_position` in its report's words) whose
    maximum-similarity patch it is, that similarity (`score`), the subject, its pair's rank among the k1
    pairs and global similarity, the patch's index in the image's patch grid and its box (start, stop)
    per axis of the subject's image (3 axes of the base-resolution CT volume, 2 of a radiograph)."""

    word: str
    word_position: int
    score: float
    subject: str
    pair_rank: int
    pair_similarity: float
    patch_index: int
    box: tuple[tuple[int, int], ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.box)


class Retrieval(NamedTuple):
    """Per word, the best keypatches: `indices` (W, k) into the codebook and their `scores` (W, k),
    best first; k = min(k3, keypatches left after exclusion)."""

    indices: torch.Tensor
    scores: torch.Tensor

    def unique(self) -> list[int]:
        """The retrieved indices word by word (best first within a word), each keypatch once."""
        return list(dict.fromkeys(int(i) for i in self.indices.reshape(-1)))


@dataclass
class _Pair:
    order: int  # position in the split (ties in similarity go to the earlier subject)
    subject: str
    row: dict  # its manifest row (the image is read from it)
    similarity: float
    patches: torch.Tensor  # (P, D)
    words: list[str]
    feats: torch.Tensor  # (W, D)


@dataclass
class Codebook:
    """Keypatch features (K, D), pixels (K, C, *p: p^3 voxels of a CT volume, p^2 of a radiograph) and
    records (K), with the build's provenance (`info`: align run, cache, kind, split, k1, k2, grid, ...)
    and the k1 pairs it kept (`pairs`)."""

    features: torch.Tensor
    patches: torch.Tensor
    keypatches: list[Keypatch]
    info: dict[str, Any]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None  # the folder it was loaded from or saved to

    def __len__(self) -> int:
        return len(self.keypatches)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def align_sha256(self) -> str:
        return str(self.info["align_sha256"])

    @property
    def spatial_dims(self) -> int:
        """3 for keypatches of CT volumes, 2 for those of radiographs (the patch grid's axes)."""
        return len(self.info["grid"])

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        run: AlignRun,
        cache: str | os.PathLike,
        k1: int = DEFAULT_K1,
        k2: int = DEFAULT_K2,
        split: str = "train",
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> Codebook:
        """The codebook of the `split` subjects of the prepared `cache` (a CT cache for a 3D run, a
        radiograph cache for a 2D one), embedded by `run`.

        Reports are the cache's Findings/Impression as the run was trained on them (its `data.text`).
        k1 and k2 larger than what the split offers keep everything. progress: a tqdm bar over subjects
        (None: on a terminal).
        """
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        from medsyn.alignment.data import PairCache
        from medsyn.data.cache import MANIFEST_FILE, SPLITS

        for name, value in (("k1", k1), ("k2", k2), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ConfigError(f"{name}={value}: expected at least 1")
        if split not in SPLITS:
            raise ConfigError(f"split={split!r}: expected one of {SPLITS}")
        cache = Path(cache)
        data = PairCache.open(cache)
        check_pairs(run, data)
        rows = data.rows(split)
        if not rows:
            raise DataError(f"{cache / MANIFEST_FILE}: no {split!r} subjects to build a codebook from")
        text = str((run.config.get("data") or {}).get("text", "both"))
        loader = DataLoader(data.dataset(rows, text), batch_size=batch_size, shuffle=False, num_workers=0)
        p = run.patch_size
        kept: list[_Pair] = []
        grid: Grid | None = None
        bar = tqdm(
            total=len(rows),
            desc="codebook",
            unit="subject",
            disable=None if progress is None else not progress,
        )
        for start, batch in zip(range(0, len(rows), batch_size), loader, strict=True):
            batch_rows = rows[start : start + batch_size]
            shape = tuple(batch["x"].shape[2:])
            if any(n % p for n in shape):
                raise DataError(
                    f"{data.source(batch_rows[0])}: grid {shape} does not split into patches of "
                    f"{p} pixels per side (the align run's model.patch_size)"
                )
            volumes, patches, batch_grid = run.encode_volumes(batch["x"])  # (B, D), (B, P, D)
            if grid is not None and batch_grid != grid:
                raise DataError(
                    f"{data.source(batch_rows[0])}: patch grid {batch_grid}, but earlier subjects have {grid}"
                )
            grid = batch_grid
            reports, words, feats = run.encode_reports(list(batch["text"]))  # (B, D), W_i words, (W_i, D)
            similarity = (reports * volumes).sum(-1).cpu()  # (B,)
            for b, row in enumerate(batch_rows):
                # clones, not views that would keep the whole batch alive
                pair = _Pair(start + b, row["id"], row, float(similarity[b]), patches[b].cpu().clone(),
                             words[b], feats[b].cpu().clone())  # fmt: skip
                kept.append(pair)
            kept = sorted(kept, key=lambda pair: (-pair.similarity, pair.order))[:k1]
            bar.update(len(batch_rows))
        bar.close()
        assert grid is not None
        keypatches, features, voxels = _select_keypatches(kept, k2, grid, p, data)
        if not keypatches:
            raise DataError(f"{cache / MANIFEST_FILE}: the {split!r} reports have no words; no keypatches")
        info = {
            "format": FORMAT,
            "align_run": str(run.run_dir.resolve()),
            "align_sha256": run.sha256,
            "cache": str(cache.resolve()),
            "kind": data.kind,
            "split": split,
            "text": text,
            "k1": int(k1),
            "k2": int(k2),
            "subjects": len(rows),
            "patch_size": p,
            "grid": list(grid),
            "dim": int(features.shape[1]),
        }
        pairs = [
            {"rank": r, "subject": pair.subject, "similarity": pair.similarity} for r, pair in enumerate(kept)
        ]
        return cls(features, voxels, keypatches, info, pairs)

    # ---- retrieval ---------------------------------------------------------------------------------
    def allowed(self, exclude_subjects: str | Iterable[str] = ()) -> torch.Tensor:
        """(K,) bool: the keypatches whose subject is not in `exclude_subjects`."""
        excluded = {exclude_subjects} if isinstance(exclude_subjects, str) else set(exclude_subjects)
        return torch.tensor([kp.subject not in excluded for kp in self.keypatches], dtype=torch.bool)

    def similarity(self, word_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (W, K) of word features (W, D) with every keypatch feature."""
        if word_features.ndim != 2 or word_features.shape[1] != self.dim:
            raise ValueError(
                f"word_features: expected shape (W, {self.dim}), got {tuple(word_features.shape)}"
            )
        words = F.normalize(word_features.detach().to("cpu", torch.float32), dim=-1)
        return words @ F.normalize(self.features.float(), dim=-1).T

    def retrieve(
        self, word_features: torch.Tensor, k3: int = DEFAULT_K3, exclude_subjects: str | Iterable[str] = ()
    ) -> Retrieval:
        """Per word of `word_features` (W, D), the k3 keypatches of highest similarity (ties: the lower
        index), never one of `exclude_subjects`: indices and scores (W, k)."""
        if int(k3) < 1:
            raise ConfigError(f"k3={k3}: expected at least 1")
        allowed = self.allowed(exclude_subjects)
        scores = self.similarity(word_features).masked_fill(~allowed, float("-inf"))  # (W, K)
        k = min(int(k3), int(allowed.sum()))
        scores, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return Retrieval(indices[:, :k], scores[:, :k])

    def check_run(self, run: AlignRun, force: bool = False) -> None:
        """Refuse (DataError) an align run other than the one that built the codebook, unless `force`:
        its features would live in another embedding space."""
        if force or run.sha256 == self.align_sha256:
            return
        where = self.path / JSON_FILE if self.path is not None else "the codebook"
        raise DataError(
            f"{where}: built with the align run {self.info.get('align_run')} (weights sha256 "
            f"{self.align_sha256[:12]}), not with {run.weights} (sha256 {run.sha256[:12]}); rebuild it with "
            f"`medsyn codebook build --align {run.run_dir}` or pass --force"
        )

    # ---- files -------------------------------------------------------------------------------------
    def to_json(self, tensors_sha256: str) -> dict[str, Any]:
        """The codebook.json content (tensors excluded)."""
        records = [
            {"index": i, **asdict(kp), "box": [list(b) for b in kp.box]}
            for i, kp in enumerate(self.keypatches)
        ]
        return {
            **self.info,
            "count": len(self),
            "pairs": self.pairs,
            "keypatches": records,
            "tensors": {"file": TENSORS_FILE, "sha256": tensors_sha256},
        }

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write codebook.safetensors then codebook.json into `folder` (see `check_out_dir`)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        check_out_dir(folder, overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "features": self.features.detach().cpu().float().contiguous(),
            "patches": self.patches.detach().cpu().contiguous(),
        }
        # both written to temporary names; on leaving the blocks the inner (tensors) is renamed first
        with atomic_path(folder / JSON_FILE) as tmp_json, atomic_path(folder / TENSORS_FILE) as tmp_tensors:
            save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT})
            usual_mode(tmp_tensors)
            write_json(tmp_json, self.to_json(sha256_file(tmp_tensors)))
        (folder / SHEET_FILE).unlink(missing_ok=True)  # a previous build's preview no longer applies
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Codebook:
        """A saved codebook; every inconsistency is a one-line DataError naming the file."""
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        json_path, tensors_path = folder / JSON_FILE, folder / TENSORS_FILE
        if not folder.is_dir():
            raise DataError(f"{folder}: no such codebook folder; build one with `medsyn codebook build`")
        for path in (json_path, tensors_path):
            if not path.is_file():
                raise DataError(
                    f"{path}: missing; not a medsyn codebook (build one with `medsyn codebook build`)"
                )
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{json_path}: not readable JSON ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{json_path}: format {got!r}, expected {FORMAT!r}")
        recorded = (data.get("tensors") or {}).get("sha256")
        if recorded != sha256_file(tensors_path):
            raise DataError(
                f"{tensors_path}: its sha256 differs from the one {JSON_FILE} records; the two files "
                "come from different builds (build the codebook again)"
            )
        try:
            with safe_open(str(tensors_path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"{tensors_path}: not a readable safetensors file ({err})") from err
        info = {k: v for k, v in data.items() if k not in ("count", "pairs", "keypatches", "tensors")}
        keypatches = _read_records(json_path, data)
        features, patches = _check_tensors(tensors_path, tensors, info, len(keypatches))
        for i, kp in enumerate(keypatches):
            expected = patch_box(kp.patch_index, info["grid"], info["patch_size"])
            if kp.slices != expected:
                raise DataError(
                    f"{json_path}: keypatches[{i}].box {list(kp.box)} is not the box of patch "
                    f"{kp.patch_index} of grid {info['grid']} ({expected})"
                )
        return cls(features, patches, keypatches, info, list(data.get("pairs") or []), folder)


def check_pairs(run: AlignRun, data: PairCache) -> None:
    """Refuse (DataError) a cache whose images are not of the kind `run` was trained on (a radiograph
    cache for a CT run, or the other way round)."""
    if (run.spatial_dims, run.in_channels) != (data.spatial_dims, data.channels):
        trained = "radiographs (2D)" if run.spatial_dims == 2 else "CT volumes (3D)"
        raise DataError(
            f"{data.root / 'manifest.csv'}: a {data.kind} cache ({data.spatial_dims}D, {data.channels} "
            f"channel(s)), but the align run {run.run_dir} was trained on {trained} with "
            f"{run.in_channels} channel(s); use a cache of the kind it was trained on"
        )


def _select_keypatches(
    pairs: Sequence[_Pair], k2: int, grid: Grid, p: int, data: PairCache
) -> tuple[list[Keypatch], torch.Tensor, torch.Tensor]:
    """The k2 best (word, its maximum-similarity patch) of the kept pairs: records, features (K, D) and
    pixels (K, C, *p) cut from each subject's image in `data`."""
    candidates = []  # (-score, pair rank, word position, patch index)
    for rank, pair in enumerate(pairs):
        if not pair.words:
            continue
        scores, best = (pair.feats @ pair.patches.T).max(dim=1)  # (W,) word-patch maximum similarity
        candidates += [
            (-float(s), rank, w, int(i)) for w, (s, i) in enumerate(zip(scores, best, strict=True))
        ]
    candidates.sort()
    chosen, seen = [], set()
    for neg_score, rank, w, index in candidates:
        if (rank, index) in seen:
            continue  # the same patch, found by another word of the report with a lower score
        seen.add((rank, index))
        chosen.append((-neg_score, rank, w, index))
        if len(chosen) == k2:
            break
    records, features, voxels = [], [], []
    images: dict[int, np.ndarray] = {}
    for score, rank, w, index in chosen:
        pair = pairs[rank]
        box = patch_box(index, grid, p)
        box_ = tuple((s.start, s.stop) for s in box)
        records.append(Keypatch(pair.words[w], w, score, pair.subject, rank, pair.similarity, index, box_))
        features.append(pair.patches[index])
        if rank not in images:
            images[rank] = data.load(pair.row)
        voxels.append(torch.from_numpy(np.array(images[rank][(slice(None), *box)])))
    if not records:
        return [], torch.zeros(0, 0), torch.zeros(0)
    return records, torch.stack(features).float(), torch.stack(voxels)


def _read_records(path: Path, data: dict) -> list[Keypatch]:
    for key, kind in (
        ("grid", list),
        ("patch_size", int),
        ("dim", int),
        ("keypatches", list),
        ("align_sha256", str),
    ):
        if not isinstance(data.get(key), kind):
            raise DataError(f"{path}: {key}={data.get(key)!r}, expected a {kind.__name__}")
    grid = data["grid"]
    if not grid or not all(isinstance(n, int) and n > 0 for n in grid):
        raise DataError(f"{path}: grid={grid!r}, expected positive patch counts per axis")
    if data.get("count", len(data["keypatches"])) != len(data["keypatches"]):
        raise DataError(f"{path}: count={data['count']} but {len(data['keypatches'])} keypatch records")
    records = []
    for i, record in enumerate(data["keypatches"]):
        missing = [k for k in KEYPATCH_FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            raise DataError(f"{path}: keypatches[{i}] lacks {missing}")
        try:
            kp = Keypatch(
                word=str(record["word"]),
                word_position=int(record["word_position"]),
                score=float(record["score"]),
                subject=str(record["subject"]),
                pair_rank=int(record["pair_rank"]),
                pair_similarity=float(record["pair_similarity"]),
                patch_index=int(record["patch_index"]),
                box=tuple((int(a), int(b)) for a, b in record["box"]),
            )
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: keypatches[{i}] has a malformed value ({err})") from err
        if not 0 <= kp.patch_index < int(np.prod(grid)):
            raise DataError(f"{path}: keypatches[{i}].patch_index={kp.patch_index}, outside the grid {grid}")
        records.append(kp)
    return records


def _check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], info: dict, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [k for k in ("features", "patches") if k not in tensors]
    if missing:
        raise DataError(f"{path}: no tensor(s) {missing}")
    features, patches = tensors["features"], tensors["patches"]
    p, dim, dims = info["patch_size"], info["dim"], len(info["grid"])
    if tuple(features.shape) != (count, dim) or not features.is_floating_point():
        raise DataError(
            f"{path}: features {tuple(features.shape)} {features.dtype}, expected float ({count}, "
            f"{dim}) for the {count} keypatches of {JSON_FILE}"
        )
    if patches.ndim != 2 + dims or patches.shape[0] != count or tuple(patches.shape[2:]) != (p,) * dims:
        expected = ", ".join([str(count), "C", *[str(p)] * dims])
        raise DataError(f"{path}: patches {tuple(patches.shape)}, expected ({expected})")
    if not bool(torch.isfinite(features).all()):
        raise DataError(f"{path}: features hold NaN or infinite values")
    return features.float(), patches


def check_out_dir(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (DataError) to write a codebook into a file, or into a non-empty folder without `overwrite`;
    with it, only the codebook's own files (CODEBOOK_FILES) are replaced and others are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file; expected a folder for the codebook")
    if overwrite or not folder.is_dir():
        return
    if (folder / JSON_FILE).exists() or (folder / TENSORS_FILE).exists():
        raise DataError(f"{folder}: holds a medsyn codebook; pass --overwrite to replace it")
    if any(folder.iterdir()):
        raise DataError(
            f"{folder}: not empty and not a medsyn codebook; pass --overwrite to write the codebook "
            f"files ({', '.join(CODEBOOK_FILES)}) into it, other files left as they are"
        )


def retrieve_for_report(
    codebook: Codebook,
    run: AlignRun,
    report: str,
    k3: int = DEFAULT_K3,
    exclude_subject: str | None = None,
    force: bool = False,
) -> tuple[list[str], Retrieval]:
    """The words of `report` (as `run` splits them) and, per word, its k3 best keypatches, none of
    `exclude_subject`'s. Refuses a codebook built by another align run unless `force`."""
    codebook.check_run(run, force)
    _, words, feats = run.encode_reports(report)
    excluded = () if exclude_subject is None else (exclude_subject,)
    return words[0], codebook.retrieve(feats[0], k3, excluded)


def keypatch_tokens(
    codebook: Codebook,
    run: AlignRun,
    report: str,
    k3: int = DEFAULT_K3,
    exclude_subject: str | None = None,
    force: bool = False,
) -> torch.Tensor:
    """The features (K, D) of the keypatches retrieved for `report` (`retrieve_for_report`), word by
    word in report order, best first within a word, each keypatch once (where it first appears):
    the visual clue for a base model, retrieved from a subject's own report with its own patches excluded
    so that nothing of the volume leaks into its condition. K <= words x k3; (0, D) for a wordless report."""
    _, found = retrieve_for_report(codebook, run, report, k3, exclude_subject, force)
    return codebook.features[found.unique()]


def keypatch_crops(
    codebook: Codebook, indices: Sequence[int] | torch.Tensor, data_root: str | os.PathLike | None = None
) -> torch.Tensor:
    """The pixels (K, C, *p) float32 of the keypatches `indices` (into the codebook, e.g. a
    `Retrieval.unique()` list), in that order: (K, 1, p, p) for a radiograph codebook, in the cache's
    [-1, 1] range, (K, 4, p, p, p) for a CT one.

    Without `data_root`: the crops the codebook holds, cut at build time from its cache's images (the
    same values). With it: cut again, by each keypatch's subject and box, from that cache's images (a
    subject missing there, or an image the box does not fit in, is a DataError naming it).
    """
    from medsyn.alignment.data import PairCache

    indices = [
        int(i) for i in (indices.reshape(-1).tolist() if isinstance(indices, torch.Tensor) else indices)
    ]
    bad = [i for i in indices if not 0 <= i < len(codebook)]
    if bad:
        raise ValueError(f"keypatch indices {bad[:5]}: outside the codebook's {len(codebook)} keypatches")
    if data_root is None:
        return codebook.patches[indices].float()  # (K, C, *p)
    data = PairCache.open(data_root)
    if data.spatial_dims != codebook.spatial_dims:
        raise DataError(
            f"{data.root / 'manifest.csv'}: a {data.kind} cache ({data.spatial_dims}D), but the codebook's "
            f"keypatches are {codebook.spatial_dims}D"
        )
    wanted = {codebook.keypatches[i].subject for i in indices}
    rows = {row["id"]: row for row in data.rows() if row["id"] in wanted}
    missing = sorted(wanted - set(rows))
    if missing:
        raise DataError(
            f"{data.root / 'manifest.csv'}: no subject(s) {missing[:5]} that the keypatches come from"
        )
    images = {subject: data.load(row) for subject, row in rows.items()}
    crops = []
    for i in indices:
        kp = codebook.keypatches[i]
        image = images[kp.subject]
        if any(b > n for (_, b), n in zip(kp.box, image.shape[1:], strict=True)):
            raise DataError(
                f"{data.source(rows[kp.subject])}: image of shape {tuple(image.shape[1:])} does not hold "
                f"keypatch {i}'s box {[list(b) for b in kp.box]}"
            )
        crops.append(torch.from_numpy(np.array(image[(slice(None), *kp.slices)], dtype=np.float32)))
    if not crops:
        return codebook.patches[:0].float()
    return torch.stack(crops)  # (K, C, *p)
