"""Keypatches as extra cross-attention tokens of the base model (the second seed paper's section 2.3,
"keypatches as visual clues", in 3D).

`KeypatchConditioner` retrieves, for each report, the codebook's keypatches its words point to
(`retrieve_for_report`: the k3 best per word, each keypatch once), projects their alignment features to
the width of the text tokens, marks them with a learned type embedding and appends them to the text's
tokens and mask. In training a report comes with its subject, whose own keypatches are never retrieved:
the condition holds no patch of the volume being denoised. A new report at sampling excludes nothing.

The align run and codebook are frozen, so retrieval is a pure function of (report, excluded subject)
and is cached. Only the projection and the type embedding are weights of the base model; the align run
and codebook load from the paths in the run's `keypatches` section, and must belong together (the
codebook records the sha256 of the align run that built it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsyn.alignment.codebook import JSON_FILE, Codebook, retrieve_for_report
from medsyn.alignment.run import load_align_run
from medsyn.conditioning.features import FeatureCache
from medsyn.errors import ConfigError, MedsynError
from medsyn.weights import sha256_file

Cond = dict[str, torch.Tensor]
Item = str | tuple[str, str | None]  # a report, or (report, subject whose own keypatches are excluded)


def _as_items(inputs: str | Sequence[Item]) -> list[tuple[str, str | None]]:
    """(report, excluded subject or None) per sample; a bare string is one report excluding nothing."""
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    if not items:
        raise ValueError("the keypatch conditioner needs at least one report")
    out = []
    for i, item in enumerate(items):
        report, subject = (item, None) if isinstance(item, str) else tuple(item)
        if not isinstance(report, str) or not (subject is None or isinstance(subject, str)):
            raise TypeError(
                f"keypatch input {i} is {item!r}; expected a report or (report, subject id or None)"
            )
        out.append((report, subject))
    return out


def is_null(cond: Cond, null: Cond) -> torch.Tensor:
    """(B,) bool: the samples of `cond` (context (B, L, H), context_mask (B, L)) that are exactly `null`,
    the condition dropout of training having replaced them by it."""
    same_mask = (cond["context_mask"] == null["context_mask"]).flatten(1).all(1)
    same_context = (cond["context"] == null["context"].to(cond["context"].dtype)).flatten(1).all(1)
    return same_mask & same_context


class KeypatchConditioner(nn.Module):
    """Keypatch tokens (B, max_tokens, context_dim) with their mask, appended to the text's tokens.

    align: the `train.py align` run directory whose embeddings retrieve the keypatches.
    codebook: the codebook folder (`medsyn codebook build`), built with that align run.
    k3: keypatches retrieved per word of the report.
    max_tokens: keypatch tokens per sample; fewer retrieved are padded (mask False), more are cut
        (the first in retrieval order: report word order, best first within a word, are kept).
    ucg_rate: probability that a training sample's keypatch tokens are dropped on their own; they are
        always dropped with the text's condition, so the null condition has none.
    cache_size: (report, subject) retrievals kept in an LRU cache (0 disables it).
    context_dim: the width of the text tokens they join (set by the model builder, not the config).
    """

    key = "keypatches"  # the batch entry it reads: reports, or (report, subject id) pairs
    joins = "text"  # the conditioner whose tokens it appends to

    def __init__(
        self,
        align: str | os.PathLike,
        codebook: str | os.PathLike,
        k3: int = 3,
        max_tokens: int = 32,
        ucg_rate: float = 0.1,
        cache_size: int = 4096,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("k3", k3, 1), ("max_tokens", max_tokens, 1), ("cache_size", cache_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"keypatches.{name}={value!r}: expected an integer >= {low}")
        if not 0.0 <= float(ucg_rate) <= 1.0:
            raise ConfigError(f"keypatches.ucg_rate={ucg_rate!r}: expected a probability in [0, 1]")
        if context_dim is None:
            raise ConfigError("keypatches: its tokens join the text's; the run config needs a text section")
        try:
            self.run = load_align_run(align)  # a plain attribute: frozen, outside the state dict
        except MedsynError as err:
            raise ConfigError(f"keypatches.align: {err}") from err
        try:
            self.codebook = Codebook.load(codebook)
        except MedsynError as err:
            raise ConfigError(f"keypatches.codebook: {err}") from err
        if self.codebook.align_sha256 != self.run.sha256:
            raise ConfigError(
                f"keypatches.codebook={codebook}: built with the align run {self.codebook.info.get('align_run')} "
                f"(sha256 {self.codebook.align_sha256[:12]}), not with keypatches.align={align} (sha256 "
                f"{self.run.sha256[:12]}); rebuild it with `medsyn codebook build --align {align}`"
            )
        self.codebook_sha256 = sha256_file(Path(codebook) / JSON_FILE)  # it records the tensors' sha256
        self.k3, self.max_tokens, self.ucg_rate = k3, max_tokens, float(ucg_rate)
        self.proj = nn.Linear(self.codebook.dim, context_dim)  # D_align -> the text tokens' width
        self.type_embedding = nn.Parameter(torch.randn(context_dim) * 0.02)  # (H,): "a keypatch, not a word"
        self._cache = FeatureCache(cache_size)

    def extra_repr(self) -> str:
        return (
            f"align={str(self.run.run_dir)!r}, codebook={str(self.codebook.path)!r}, keypatches="
            f"{len(self.codebook)}, k3={self.k3}, max_tokens={self.max_tokens}, ucg_rate={self.ucg_rate}"
        )

    def retrieve(self, report: str, exclude_subject: str | None = None) -> list[int]:
        """Codebook indices of the keypatches for `report`, at most max_tokens, in retrieval order,
        none of `exclude_subject`'s own; cached per (report, subject)."""
        key = f"{exclude_subject}\0{report}" if exclude_subject is not None else f"\0\0{report}"
        found = self._cache.get(key) if self._cache.maxsize else None
        if found is None:
            _, retrieval = retrieve_for_report(self.codebook, self.run, report, self.k3, exclude_subject)
            found = torch.tensor(retrieval.unique()[: self.max_tokens], dtype=torch.long)
            self._cache.put(key, found)
        return found.tolist()

    def tokens(self, inputs: str | Sequence[Item]) -> Cond:
        """The keypatch tokens of each sample, without condition dropout: context (B, max_tokens, H),
        zero at padding, and context_mask (B, max_tokens)."""
        items = _as_items(inputs)
        device = self.proj.weight.device
        features = self.codebook.features.new_zeros(
            len(items), self.max_tokens, self.codebook.dim
        )  # (B, T, D)
        mask = torch.zeros(len(items), self.max_tokens, dtype=torch.bool)  # (B, T)
        for b, (report, subject) in enumerate(items):
            found = self.retrieve(report, subject)
            features[b, : len(found)] = self.codebook.features[found]
            mask[b, : len(found)] = True
        features, mask = features.to(device), mask.to(device)
        context = (self.proj(features) + self.type_embedding) * mask[..., None]  # (B, T, H)
        return {"context": context, "context_mask": mask}

    def forward(
        self,
        inputs: str | Sequence[Item],
        *,
        train: bool = False,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        joined: Cond,
        joined_null: Cond,
    ) -> Cond:
        """The text's tokens `joined` (context (B, L, H), context_mask (B, L)) followed by the keypatch
        tokens: (B, L + max_tokens, H) and (B, L + max_tokens). In training (`train=True`) a sample's
        keypatch tokens are dropped where the text's condition was (it equals `joined_null`) and with
        probability ucg_rate besides (one draw per sample from `generator`)."""
        own = self.tokens(inputs)
        if len(own["context"]) != len(joined["context"]):
            raise ValueError(f"{len(own['context'])} keypatch inputs for {len(joined['context'])} texts")
        if train:
            gen = generator if isinstance(generator, torch.Generator) else None
            draw_device = gen.device if gen is not None else torch.device("cpu")
            drawn = torch.rand(len(own["context"]), generator=gen, device=draw_device) < self.ucg_rate  # (B,)
            keep = ~(drawn.to(own["context"].device) | is_null(joined, joined_null))  # (B,)
            own = {
                "context": own["context"] * keep[:, None, None],
                "context_mask": own["context_mask"] & keep[:, None],
            }
        return {
            "context": torch.cat([joined["context"], own["context"].to(joined["context"].dtype)], dim=1),
            "context_mask": torch.cat([joined["context_mask"], own["context_mask"]], dim=1),
        }

    def unconditional(self, cond: Cond) -> None:
        """No null of its own: the text's null condition spans the joined tokens, so the unconditional
        branch of classifier-free guidance carries no keypatch token."""
        return None

    def unet_arguments(self) -> dict[str, Any]:
        """None: the text conditioner fixes the token width (`context_dim`)."""
        return {}

    def provenance(self) -> dict[str, str]:
        """The align run and codebook the tokens come from, with their sha256 (meta.json of samples)."""
        return {
            "align": str(self.run.run_dir),
            "align_sha256": self.run.sha256,
            "codebook": str(self.codebook.path),
            "codebook_sha256": self.codebook_sha256,
        }
