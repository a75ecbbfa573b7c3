"""Report pairs for fine-tuning the text encoder: masked language modelling plus paired-section prediction.

Each item is one subject's Findings with, half the time, its own Impression (paired) and otherwise
another subject's (not paired). Batches are `{"input_ids", "token_type_ids", "attention_mask": (B, L),
"labels": (B, L) with -100 where no token is masked, "paired_label": (B,) 0 = paired, 1 = swapped}`
(BERT's next-sentence convention). The swap and the masking are seeded by the sampler's draw id (or
the index, for evaluation), so a resumed run and an evaluation see exactly the same batches.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medsyn.data.cache import MANIFEST_FILE, SPLITS, split_for
from medsyn.data.datamodule import CacheDataModule, split_key
from medsyn.errors import DataError


def read_reports(root: str | os.PathLike) -> list[dict]:
    """`{id, findings, impression, split}` rows of a manifest.csv (a prepared cache, a phantom folder, or
    any CSV with those columns; `root` is the folder or the file). Without a `split` column the split
    comes from a hash of the id, as `medsyn prepare` assigns it."""
    path = Path(root)
    path = path / MANIFEST_FILE if path.is_dir() else path
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"{path}: cannot read the reports ({err}); expected a CSV with id, findings, impression"
        ) from err
    missing = [c for c in ("id", "findings", "impression") if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(f"{path}: expected id, findings and impression columns and at least one row"
                        + (f" (missing {missing})" if missing else ""))  # fmt: skip
    for row in rows:
        if row.get("split") not in SPLITS:
            row["split"] = split_for(row["id"])
    return rows


class ReportPairs(Dataset):
    """Findings with their own or (with `swap_probability`) another subject's differing Impression."""

    def __init__(self, rows: list[dict], swap_probability: float = 0.5, seed: int = 0) -> None:
        self.rows = [r for r in rows if r.get("findings", "").strip() and r.get("impression", "").strip()]
        self.swap_probability, self.seed = swap_probability, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, draw = split_key(key)
        draw = index if draw is None else draw
        rng = np.random.default_rng([self.seed, draw, index])
        row = self.rows[index]
        impression, swapped = row["impression"], 0
        if rng.random() < self.swap_probability:
            others = [r["impression"] for r in self.rows if r["impression"].strip() != impression.strip()]
            if others:  # an identical Impression elsewhere would make the label unlearnable noise
                impression, swapped = others[int(rng.integers(len(others)))], 1
        return {"findings": row["findings"], "impression": impression, "paired_label": swapped, "key": draw}


class ReportCollator:
    """Tokenize (Findings, Impression) pairs and mask `mlm_probability` of the tokens (BERT's 80/10/10)."""

    def __init__(
        self, tokenizer, max_length: int = 192, mlm_probability: float = 0.15, seed: int = 0
    ) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [i["findings"] for i in items], [i["impression"] for i in items], truncation="longest_first",
            max_length=self.max_length, padding=True, return_special_tokens_mask=True, return_tensors="pt",
        )  # fmt: skip
        special = enc.pop("special_tokens_mask").bool() | ~enc["attention_mask"].bool()
        # one generator per batch, from its items' draw ids: the same masks whatever the worker or resume
        self.masker.generator = torch.Generator().manual_seed(
            hash((self.seed, *(i["key"] for i in items))) % 2**62
        )
        enc["input_ids"], enc["labels"] = self.masker.torch_mask_tokens(enc["input_ids"], special)
        enc["paired_label"] = torch.tensor([i["paired_label"] for i in items])
        return dict(enc)


class ReportDataModule(CacheDataModule):
    """Report pairs of a prepared cache's (or any manifest's) splits; evaluation on `val`, else `test`."""

    def __init__(self, root, tokenizer, batch_size: int = 16, num_workers: int = 0, seed: int = 0,
                 max_length: int = 192, mlm_probability: float = 0.15, swap_probability: float = 0.5) -> None:  # fmt: skip
        super().__init__(root, batch_size, num_workers, seed)
        self.swap_probability = swap_probability
        self.collate_fn = ReportCollator(tokenizer, max_length, mlm_probability, seed)

    def make_dataset(self, rows: list[dict], split: str) -> Dataset:
        return ReportPairs(rows, self.swap_probability, self.seed)

    def setup(self, stage: str | None = None) -> None:
        rows = read_reports(self.root)
        for split in SPLITS:
            self.datasets[split] = self.make_dataset([r for r in rows if r["split"] == split], split)
        if len(self.datasets["train"]) < 2:
            raise DataError(f"{self.root}: fewer than 2 training reports with both Findings and Impression")

    def held_out_split(self) -> str:
        """The split the metrics are measured on: val, or test when val is empty."""
        if not self.datasets:
            self.setup()
        return "val" if len(self.datasets["val"]) else "test"

    def val_dataloader(self):
        return self._loader(self.held_out_split(), shuffle=False)
