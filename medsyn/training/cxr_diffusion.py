"""`train.py cxr-diffusion`: the radiograph baseline, the base stage's text-conditioned diffusion in 2-D.

Issue 15 compares the report-to-radiograph language model with "our diffusion UNet in 2D trained for the
same time on the same data"; this is that UNet. Everything but the data is the base stage's: the same
LightningModule (`DiffusionModule`), model builder (the run's `channels: [image]` gives a 1-channel UNet,
the `cxr-demo` preset `spatial_dims: 2`), text conditioner with condition dropout, loss, EMA, checkpoints
and export (`medsyn.training.run.train`). The data are a radiograph cache's (`medsyn drr`,
`RadiographDataModule`), area-downsampled to `data.size` when that is smaller than the cached images; the
size is recorded in the run config, so sampling (`medsyn.generation.diffusion2d`) needs only the weights.
`trainer.max_time` (e.g. "00:00:10:00") stops a run after a fixed time, as a comparison needs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset

from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.nn.build import model_config
from medsyn.radiograph.cache import read_radiograph_manifest
from medsyn.radiograph.datamodule import RadiographDataModule, RadiographDataset
from medsyn.training.run import train

STAGE = "cxr-diffusion"


class AreaResized(Dataset):
    """A radiograph dataset's items with `x` (1, S, S) area-averaged to (1, size, size)."""

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset, self.size = dataset, int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        item = self.dataset[key]
        x = item["x"]  # (1, S, S)
        if x.shape[-1] == self.size:
            return item
        if x.shape[-1] < self.size:
            raise DataError(
                f"{item['id']}: a {x.shape[-1]}^2 image; data.size={self.size} expects images of at least that size"
            )
        x = F.interpolate(x[None], size=(self.size, self.size), mode="area")[0]  # (1, size, size)
        return {**item, "x": x.contiguous()}


class RadiographImages(RadiographDataModule):
    """`RadiographDataModule` batches `{"x": (B, 1, size, size), "text", "id"}` at `size` (None: as cached)."""

    def __init__(self, root, batch_size: int = 1, num_workers: int = 0, seed: int = 0, text: str = "both",
                 size: int | None = None) -> None:  # fmt: skip
        super().__init__(root, batch_size, num_workers, seed, text)
        self.image_size = size

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        dataset = RadiographDataset(rows, self.text)
        return dataset if self.image_size is None else AreaResized(dataset, self.image_size)


def radiograph_data(cfg: DictConfig, root: Path) -> RadiographImages:
    """The data of a cxr-diffusion run (`train`'s `build_data`)."""
    return RadiographImages(root, int(cfg.data.batch_size), int(cfg.data.num_workers), int(cfg.seed),
                            str(cfg.data.text), cfg.data.size)  # fmt: skip


def cached_size(root: str | Path) -> int:
    """The side of a radiograph cache's images (all of them the same), from its manifest."""
    rows = read_radiograph_manifest(root)  # a DataError naming the file and `medsyn drr` when missing
    if not any(r["split"] == "train" for r in rows):
        raise DataError(f"{Path(root) / 'manifest.csv'}: no training subjects; expected a radiograph cache")
    sizes = sorted({int(r["size"]) for r in rows if r.get("size")})
    if len(sizes) != 1:
        raise DataError(
            f"{Path(root) / 'manifest.csv'}: images of sizes {sizes}; expected one size (see its size column)"
        )
    return sizes[0]


def check_config(cfg: DictConfig) -> None:
    """What the base stage allows but a radiograph run cannot use: 3-D models, phantom data, previews."""
    where = "the cxr-diffusion config"
    dims = model_config(to_container(cfg.model)).get("spatial_dims", 3)
    if dims != 2:
        raise ConfigError(
            f"{where}: model.spatial_dims={dims}; radiographs need a 2-D UNet (e.g. preset cxr-demo)"
        )
    if cfg.data.get("phantoms"):
        raise ConfigError(
            f"{where}: data.phantoms is for CT caches; make radiographs with `medsyn drr --input CACHE "
            f"--out {cfg.data.root}` and set data.phantoms to null"
        )
    if cfg.preview.every_n_steps:
        raise ConfigError(
            f"{where}: preview.every_n_steps={cfg.preview.every_n_steps}; previews render CT volumes, so "
            "set it to 0 and draw radiographs from the run with `sample.py --cxr RUN`"
        )
    size = cfg.data.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 8):
        raise ConfigError(f"{where}: data.size={size!r}; expected null (the cached size) or an integer >= 8")


def train_cxr_diffusion(cfg: DictConfig) -> Path:
    """Run (or resume) `train.py cxr-diffusion`; returns the run directory (config.yaml, checkpoints/,
    logs/, model.safetensors with the EMA weights and the run config, `data.size` filled in)."""
    check_config(cfg)
    cached = cached_size(cfg.data.root)
    size = cached if cfg.data.size is None else int(cfg.data.size)
    if size > cached:
        raise ConfigError(
            f"data.size={size}: larger than the {cached}^2 images of {cfg.data.root}; expected at most {cached} "
            "(images are only ever downsampled)"
        )
    cfg = copy.deepcopy(cfg)
    cfg.data.size = size
    return train(cfg, build_data=radiograph_data)
