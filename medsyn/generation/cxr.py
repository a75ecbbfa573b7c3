"""Radiographs from a trained generator run (`sample.py --cxr RUN`), and the keypatch clues of the
report-to-radiograph language model.

`sample_cxr` reads the run's stage: a `train.py cxr` run samples image tokens with its language model
(`medsyn.radiograph.sample`) from the instruction, the prompt and the VQ codes of the keypatches the prompt
retrieves, and decodes them with the run's VQ-GAN; a `train.py cxr-diffusion` run samples with
`medsyn.generation.diffusion2d.sample_images`. Either way the samples are written by
`medsyn.radiograph.output` (image.png, keypatches.png, meta.json per sample, atomically).

`KeypatchClues` (shared with `train.py cxr`): the keypatches a report retrieves from a 2D alignment
codebook (`medsyn.alignment.codebook`: per word its k3 best; of those the `max_keypatches` of highest
word-keypatch similarity, each once), their pixel crops and their VQ codes (crops resized to a multiple of the VQ-GAN's
downsampling factor where needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from medsyn.errors import ConfigError, DataError
from medsyn.radiograph.output import CXRSample, package_versions, write_cxr_samples
from medsyn.weights import sha256_file

CONFIG_FILE = "config.yaml"
LM_STAGE, DIFFUSION_STAGE = "cxr", "cxr-diffusion"


def load_vqgan(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The VQ-GAN of a `train.py vqgan` run (`medsyn.radiograph.vqgan.load_vqgan`)."""
    from medsyn.radiograph.vqgan import load_vqgan as load

    return load(run_dir, device)


def module_device(module: Any) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def encode_crops(vqgan: Any, crops: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """VQ codes (K, hk, wk) of image crops (K, 1, p, p) in [-1, 1]; a crop whose side is not a multiple of
    the VQ-GAN's downsampling factor d is resized (bilinear) to the nearest multiple (at least d)."""
    d = int(vqgan.downsample)
    side = int(crops.shape[-1])
    target = max(d, round(side / d) * d)
    device = module_device(vqgan)
    out = []
    for start in range(0, len(crops), batch_size):
        x = crops[start : start + batch_size].float().to(device)
        if target != side:
            x = F.interpolate(x, size=(target, target), mode="bilinear", align_corners=False).clamp(-1, 1)
        out.append(vqgan.encode(x).long().cpu())
    if not out:
        return torch.zeros(0, target // d, target // d, dtype=torch.long)
    return torch.cat(out)


@dataclass(frozen=True)
class Clue:
    """One retrieved keypatch: its index in the codebook, the word that chose it, that word's similarity
    with it, and the subject it was cut from."""

    index: int
    word: str
    score: float
    subject: str


class KeypatchClues:
    """Keypatch retrieval for reports, with each keypatch's crop (K, 1, p, p) and VQ codes (K, hk, wk)."""

    def __init__(self, align: Any, codebook: Any, vqgan: Any, k3: int = 3, max_keypatches: int = 8) -> None:
        from medsyn.alignment.codebook import keypatch_crops

        if codebook.spatial_dims != 2:
            raise DataError(f"{codebook.path}: a codebook of {codebook.spatial_dims}D keypatches; expected one "
                            "built from a radiograph cache (2D)")  # fmt: skip
        if int(k3) < 1 or int(max_keypatches) < 1:
            raise ConfigError(
                f"keypatches.k3={k3}, max_keypatches={max_keypatches}: expected at least 1 each"
            )
        codebook.check_run(align)
        self.align, self.codebook, self.k3, self.max_keypatches = (
            align,
            codebook,
            int(k3),
            int(max_keypatches),
        )
        self.crops = keypatch_crops(codebook, range(len(codebook)))[:, :1]  # (K, 1, p, p)
        self.codes = encode_crops(vqgan, self.crops)  # (K, hk, wk)

    @classmethod
    def load(cls, spec: Mapping[str, Any], vqgan: Any, device: str | torch.device = "cpu") -> KeypatchClues:
        """From a `keypatches` config section: {align: RUN, codebook: DIR, k3, max_keypatches}."""
        from medsyn.alignment.codebook import Codebook
        from medsyn.alignment.run import load_align_run

        align = load_align_run(spec["align"], device)
        return cls(
            align, Codebook.load(spec["codebook"]), vqgan, spec.get("k3", 3), spec.get("max_keypatches", 8)
        )

    @property
    def grid(self) -> tuple[int, int]:
        """(hk, wk): the VQ token grid of one keypatch."""
        return (int(self.codes.shape[1]), int(self.codes.shape[2]))

    def retrieve(self, report: str, exclude_subject: str | None = None) -> list[Clue]:
        """The keypatches `report` retrieves: of each word's k3 best, the max_keypatches (word, keypatch)
        pairs of highest similarity over the whole report, best first, each keypatch once under the word
        that scored it highest (ties: the earlier word); none of `exclude_subject`'s (a training subject's
        own report must not see its image)."""
        from medsyn.alignment.codebook import retrieve_for_report

        if not report.strip():
            return []
        words, found = retrieve_for_report(self.codebook, self.align, report, self.k3, exclude_subject)
        pairs = []  # (-score, word position, rank within the word, keypatch index)
        for w, (indices, scores) in enumerate(
            zip(found.indices.tolist(), found.scores.tolist(), strict=True)
        ):
            pairs += [(-s, w, r, i) for r, (i, s) in enumerate(zip(indices, scores, strict=True))]
        clues: dict[int, Clue] = {}
        for neg_score, w, _, index in sorted(pairs):
            if index not in clues and len(clues) < self.max_keypatches:
                clues[index] = Clue(int(index), words[w], -neg_score, self.codebook.keypatches[index].subject)
        return list(clues.values())

    def codes_of(self, clues: Sequence[Clue]) -> torch.Tensor:
        """(K, hk, wk) VQ codes of `clues`, in order."""
        return self.codes[[c.index for c in clues]]

    def crops_of(self, clues: Sequence[Clue]) -> torch.Tensor:
        """(K, 1, p, p) pixels of `clues`, in order."""
        return self.crops[[c.index for c in clues]]

    def provenance(self) -> dict[str, dict[str, str]]:
        """{"align": {path, sha256}, "codebook": {path, sha256}} (the codebook's: of its codebook.json,
        which records its tensors' sha256)."""
        folder = Path(self.codebook.path)
        return {
            "align": {"path": str(self.align.weights), "sha256": self.align.sha256},
            "codebook": {"path": str(folder), "sha256": sha256_file(folder / "codebook.json")},
        }


@dataclass
class CXRSampleOptions:
    """Sampler settings: temperature, top_p and guidance for the language model; steps (None: the run's)
    and guidance for the diffusion baseline; batch_size (samples do not depend on it)."""

    temperature: float = 1.0
    top_p: float = 0.95
    guidance: float = 1.0
    steps: int | None = None
    batch_size: int = 1

    def for_generator(self, generator: str) -> dict[str, Any]:
        """The settings a generator uses (recorded in meta.json)."""
        keys = ("temperature", "top_p", "guidance", "batch_size") if generator == "lm" else (
            "steps", "guidance", "batch_size")  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k in keys}


def run_stage(run_dir: str | os.PathLike) -> str:
    """The stage of a run directory, from its config.yaml ("cxr" or "cxr-diffusion")."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; --cxr expects a `train.py cxr` or `train.py cxr-diffusion` run"
        )
    try:
        stage = OmegaConf.load(path).get("stage")
    except Exception as err:  # yaml errors and OmegaConf's
        raise DataError(f"{path}: not a readable run config ({err})") from err
    if stage not in (LM_STAGE, DIFFUSION_STAGE):
        raise DataError(f"{path}: stage {stage!r}; --cxr expects a {LM_STAGE} or {DIFFUSION_STAGE} run "
                        "(a CT run samples with --base)")  # fmt: skip
    return str(stage)


def sample_cxr(
    run_dir: str | os.PathLike,
    requests: Sequence[tuple[str, int]],
    options: CXRSampleOptions,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    overwrite: bool = False,
    log: Any = None,
    progress: bool | None = None,
) -> Path:
    """Sample each (prompt, seed) of `requests` with the run at `run_dir` and write OUT/<index>/."""
    for index, (prompt, _) in enumerate(requests):
        if not str(prompt).strip():
            raise DataError(f"prompt of sample {index} is empty; expected a report text")
    if int(options.batch_size) < 1:
        raise DataError(f"--batch-size {options.batch_size}: expected a positive integer")
    run_dir = Path(run_dir)
    stage = run_stage(run_dir)
    generator = "lm" if stage == LM_STAGE else "diffusion"
    if generator == "lm":
        weights, steps, make = _language_model(run_dir, options, device)
    else:
        weights, steps, make = _diffusion(run_dir, options, device)
    common = {"generator": generator, "run_dir": str(run_dir.resolve()),
              "options": options.for_generator(generator), "weights": weights, "versions": package_versions(),
              "device": device}  # fmt: skip
    metas = [{"index": i, "prompt": p, "seed": int(s), **common} for i, (p, s) in enumerate(requests)]
    return write_cxr_samples(out_dir, metas, make, int(options.batch_size), overwrite, steps, log, progress)


def _language_model(run_dir: Path, options: CXRSampleOptions, device: str):
    """(weights provenance, tokens per sample, make) of a `train.py cxr` run."""
    from medsyn.radiograph.lm import load_lm_run
    from medsyn.radiograph.sample import check_sampling, sample_image_codes
    from medsyn.radiograph.sequence import report_ids

    try:
        check_sampling(options.temperature, options.top_p, options.guidance)
    except ValueError as err:
        raise DataError(str(err).replace("top_p", "--top-p").replace("temperature", "--temperature")
                        .replace("guidance", "--guidance")) from err  # fmt: skip
    lm = load_lm_run(run_dir, device)
    config, layout = lm.config, lm.layout
    if float((config.get("sequence") or {}).get("ucg_rate", 0.0)) == 0.0 and options.guidance != 1.0:
        raise DataError(f"{run_dir}: trained without condition dropout (sequence.ucg_rate 0), so it has "
                        f"no unconditional model for --guidance {options.guidance:g}; pass --guidance 1")  # fmt: skip
    vqgan = load_vqgan(config["vqgan"], device)
    if vqgan.sha256 != config.get("vqgan_sha256"):
        raise DataError(f"{config['vqgan']}: its VQ-GAN weights (sha256 {str(vqgan.sha256)[:12]}) are not "
                        f"the ones {run_dir} was trained with ({str(config.get('vqgan_sha256'))[:12]})")  # fmt: skip
    clues = KeypatchClues.load(config["keypatches"], vqgan, device) if config.get("keypatches") else None
    if clues is not None and clues.grid != tuple(layout.keypatch_grid):
        raise DataError(f"{config['keypatches']['codebook']}: keypatches of {clues.grid} codes, but the "
                        f"run was trained with {tuple(layout.keypatch_grid)}")  # fmt: skip
    weights = {"lm": {"path": str(lm.weights), "sha256": lm.sha256},
               "vqgan": {"path": str(config["vqgan"]), "sha256": str(vqgan.sha256)},
               **(clues.provenance() if clues is not None else {})}  # fmt: skip

    def make(metas: list[dict], step) -> list[CXRSample]:
        found = [clues.retrieve(m["prompt"]) if clues is not None else [] for m in metas]
        conditions = [
            layout.condition(report_ids(lm.tokenizer, layout, m["prompt"]),
                             clues.codes_of(f) if clues is not None and f else None)
            for m, f in zip(metas, found, strict=True)
        ]  # fmt: skip
        codes = sample_image_codes(lm.model, layout, conditions, [m["seed"] for m in metas],
                                   temperature=options.temperature, top_p=options.top_p,
                                   guidance=options.guidance, callback=step)  # fmt: skip
        # decoded one at a time: a decoder's numerics vary with the batch size, and a sample must not
        device = module_device(vqgan)
        with torch.no_grad():
            images = torch.cat([vqgan.decode(c[None].to(device)).float().clamp(-1, 1).cpu() for c in codes])
        return [
            CXRSample(images[i], clues.crops_of(f) if clues is not None else None, [c.word for c in f],
                      {"keypatches": [asdict(c) for c in f]} if clues is not None else {})
            for i, f in enumerate(found)
        ]  # fmt: skip

    return weights, layout.image_tokens, make


def _diffusion(run_dir: Path, options: CXRSampleOptions, device: str):
    """(weights provenance, 0, make) of a `train.py cxr-diffusion` run."""
    from medsyn.generation.diffusion2d import load_cxr_diffusion, sample_images

    run = load_cxr_diffusion(run_dir, device)
    weights = {"diffusion": {"path": str(run.weights), "sha256": run.sha256}}

    def make(metas: list[dict], step) -> list[CXRSample]:
        images, provenance = sample_images(run, [m["prompt"] for m in metas], [m["seed"] for m in metas],
                                           steps=options.steps, guidance=options.guidance, device=device,
                                           batch_size=len(metas))  # fmt: skip
        images = images.float().clamp(-1, 1).cpu()
        return [CXRSample(images[i], None, [], {"provenance": provenance}) for i in range(len(metas))]

    return weights, 0, make
