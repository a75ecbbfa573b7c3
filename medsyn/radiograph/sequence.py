"""Token sequences of the report-to-radiograph language model (the second seed paper's section 2.2, "Image
Synthesis"): the vocabulary extended by the VQ-GAN's codes, the layout of a sequence, its loss mask, batch
collation and the restriction of sampling to image codes.

Vocabulary (`Vocabulary`), T = the tokenizer's size, N = the VQ-GAN's codebook size:

    0 .. T-1                  the tokenizer's text tokens
    T, T+1                    <|image|>, <|/image|>
    T+2, T+3                  <|keypatch|>, <|/keypatch|>
    T+4                       <|pad|>, only when the tokenizer has no pad token of its own
    offset .. offset+N-1      <img_0> .. <img_{N-1}>: VQ code c is token offset + c

The added ids are arithmetic, not tokenizer entries: no report text can ever produce one.

A sequence (`TokenLayout.sequence`), and its labels (the loss is on the image tokens only):

    ids:     [bos] instruction Report: report | <|keypatch|> codes of keypatches 1..K <|/keypatch|>
             | <|image|> h*w image codes (raster order) <|/image|>
    labels:  -100 on everything before the image codes; the image codes and <|/image|> as they are

The condition (everything up to and including <|image|>) is what sampling starts from; an empty report and
no keypatches is the unconditional condition of classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

IGNORE = -100  # the label of a token without loss (torch's cross_entropy ignore_index)
ADDED_TOKENS = ("<|image|>", "<|/image|>", "<|keypatch|>", "<|/keypatch|>")
PAD_TOKEN = "<|pad|>"
DEFAULT_INSTRUCTION = "Generate a frontal chest radiograph that matches this report."


@dataclass(frozen=True)
class Vocabulary:
    """The ids of the LM's vocabulary: `text_size` text tokens, the added tokens, `num_codes` image codes.

    pad_id: the tokenizer's pad token, or None (then <|pad|> is added); bos_id: the token a sequence
    starts with (the tokenizer's bos, else its cls), or None.
    """

    text_size: int
    num_codes: int
    pad_id: int | None = None
    bos_id: int | None = None

    def __post_init__(self) -> None:
        if self.text_size < 1 or self.num_codes < 1:
            raise ValueError(
                f"text_size={self.text_size}, num_codes={self.num_codes}: expected positive sizes"
            )

    @property
    def image_start(self) -> int:
        return self.text_size

    @property
    def image_end(self) -> int:
        return self.text_size + 1

    @property
    def keypatch_start(self) -> int:
        return self.text_size + 2

    @property
    def keypatch_end(self) -> int:
        return self.text_size + 3

    @property
    def pad(self) -> int:
        return self.pad_id if self.pad_id is not None else self.text_size + len(ADDED_TOKENS)

    @property
    def code_offset(self) -> int:
        """The id of <img_0>: image code c is token code_offset + c."""
        return self.text_size + len(ADDED_TOKENS) + (self.pad_id is None)

    @property
    def size(self) -> int:
        """The LM's vocabulary size (its embedding rows)."""
        return self.code_offset + self.num_codes

    def added_tokens(self) -> list[str]:
        """Names of the ids text_size .. size-1, in order."""
        pad = [] if self.pad_id is not None else [PAD_TOKEN]
        return [*ADDED_TOKENS, *pad, *(f"<img_{c}>" for c in range(self.num_codes))]

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids of VQ codes (any shape)."""
        return codes.long() + self.code_offset

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """VQ codes of image-code token ids (any shape); ValueError if one is not an image code."""
        codes = ids.long() - self.code_offset
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"token ids outside the image codes [{self.code_offset}, {self.size})")
        return codes

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        """bool (same shape): which ids are image codes."""
        return (ids >= self.code_offset) & (ids < self.size)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, num_codes: int) -> Vocabulary:
        """The vocabulary of `tokenizer` (a transformers tokenizer) extended by `num_codes` image codes."""
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        return cls(len(tokenizer), int(num_codes), tokenizer.pad_token_id, bos)


@dataclass(frozen=True)
class TokenLayout:
    """Where everything goes in a sequence (see the module docstring).

    prefix: the ids before the report ([bos], the instruction, "Report:"); image_grid (h, w): the VQ-GAN's
    token grid of an image; keypatch_grid (hk, wk): of one keypatch crop; at most `max_report_tokens`
    report tokens and `max_keypatches` keypatches.
    """

    vocab: Vocabulary
    prefix: tuple[int, ...]
    image_grid: tuple[int, int]
    keypatch_grid: tuple[int, int] = (0, 0)
    max_report_tokens: int = 128
    max_keypatches: int = 0

    @property
    def image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def keypatch_tokens(self) -> int:
        return self.keypatch_grid[0] * self.keypatch_grid[1]

    @property
    def max_condition_length(self) -> int:
        """The longest condition: prefix, a full report, all keypatches, the block markers and <|image|>."""
        keypatches = self.max_keypatches * self.keypatch_tokens
        return len(self.prefix) + self.max_report_tokens + keypatches + 3

    @property
    def max_length(self) -> int:
        """The longest sequence: the longest condition, the image codes and <|/image|>."""
        return self.max_condition_length + self.image_tokens + 1

    def condition(
        self, report_ids: Sequence[int], keypatch_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(C,) ids: prefix, the report (cut to max_report_tokens), the keypatch block, <|image|>.

        keypatch_codes: (K, hk, wk) or (K, hk*wk) VQ codes of the keypatches in retrieval order (the first
        max_keypatches are used); None or K = 0 gives an empty block."""
        v = self.vocab
        report = torch.as_tensor(list(report_ids)[: self.max_report_tokens], dtype=torch.long)
        if keypatch_codes is None or len(keypatch_codes) == 0 or self.max_keypatches == 0:
            clues = torch.zeros(0, dtype=torch.long)
        else:
            kept = keypatch_codes[: self.max_keypatches].reshape(
                min(len(keypatch_codes), self.max_keypatches), -1
            )
            if kept.shape[1] != self.keypatch_tokens:
                raise ValueError(
                    f"keypatch codes of {kept.shape[1]} tokens each; the layout expects {self.keypatch_grid}"
                )
            clues = v.code_ids(kept).reshape(-1)
        return torch.cat([
            torch.as_tensor(self.prefix, dtype=torch.long), report,
            torch.tensor([v.keypatch_start]), clues, torch.tensor([v.keypatch_end, v.image_start]),
        ])  # fmt: skip

    def sequence(
        self, report_ids: Sequence[int], keypatch_codes: torch.Tensor | None, image_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (L,) and labels (L,) of one training sequence; image_codes (h, w) in raster order.
        labels are IGNORE everywhere but at the h*w image codes and <|/image|>, where they are the ids."""
        if tuple(image_codes.shape) != self.image_grid:
            raise ValueError(f"image codes of shape {tuple(image_codes.shape)}; expected {self.image_grid}")
        condition = self.condition(report_ids, keypatch_codes)
        image = torch.cat(
            [self.vocab.code_ids(image_codes.reshape(-1)), torch.tensor([self.vocab.image_end])]
        )
        input_ids = torch.cat([condition, image])
        labels = torch.cat([torch.full_like(condition, IGNORE), image])
        return input_ids, labels

    def image_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h*w) generated image-code ids -> (B, h, w) VQ codes."""
        return self.vocab.codes(ids).reshape(ids.shape[0], *self.image_grid)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefix": list(self.prefix), "image_grid": list(self.image_grid),
                "keypatch_grid": list(self.keypatch_grid)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        return cls(
            Vocabulary(**data["vocab"]), tuple(data["prefix"]), tuple(data["image_grid"]),
            tuple(data["keypatch_grid"]), int(data["max_report_tokens"]), int(data["max_keypatches"]),
        )  # fmt: skip


def text_ids(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text` without the tokenizer's special tokens (text that spells one is split like any
    other text), cut to `max_tokens`."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return list(ids if max_tokens is None else ids[:max_tokens])


def build_layout(
    tokenizer: Any,
    num_codes: int,
    image_grid: Sequence[int],
    keypatch_grid: Sequence[int] = (0, 0),
    instruction: str = DEFAULT_INSTRUCTION,
    max_report_tokens: int = 128,
    max_keypatches: int = 0,
) -> TokenLayout:
    """The layout for `tokenizer` and a VQ-GAN of `num_codes` codes on an (h, w) `image_grid`."""
    vocab = Vocabulary.for_tokenizer(tokenizer, num_codes)
    prefix = ([vocab.bos_id] if vocab.bos_id is not None else []) + text_ids(
        tokenizer, f"{instruction} Report:"
    )
    return TokenLayout(vocab, tuple(prefix), (int(image_grid[0]), int(image_grid[1])),
                       (int(keypatch_grid[0]), int(keypatch_grid[1])), int(max_report_tokens),
                       int(max_keypatches))  # fmt: skip


def report_ids(tokenizer: Any, layout: TokenLayout, report: str) -> list[int]:
    """The report's token ids as a sequence holds them (a leading space, for byte-level BPE tokenizers)."""
    return text_ids(tokenizer, " " + report.strip(), layout.max_report_tokens) if report.strip() else []


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counted over the real tokens only (0 at a row's first one), so a left-padded row
    sees the positions it would see alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate(
    items: Sequence[Mapping[str, Any]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor | list]:
    """Pad `input_ids` (and `labels`, with IGNORE) of the items to one length on `side` ("right" for
    training, "left" for sampling). Returns input_ids, attention_mask, position_ids (B, L) long, labels
    (B, L) when the items have them, and any other keys as lists."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    length = max(len(item["input_ids"]) for item in items)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        fill = torch.full((length - len(t),), value, dtype=torch.long)
        return torch.cat([t.long(), fill] if side == "right" else [fill, t.long()])

    ones = [torch.ones(len(item["input_ids"]), dtype=torch.long) for item in items]
    out: dict[str, torch.Tensor | list] = {
        "input_ids": torch.stack([pad(item["input_ids"], pad_id) for item in items]),
        "attention_mask": torch.stack([pad(m, 0) for m in ones]),
    }
    out["position_ids"] = position_ids(out["attention_mask"])
    if "labels" in items[0]:
        out["labels"] = torch.stack([pad(item["labels"], IGNORE) for item in items])
    for key in items[0]:
        if key not in out:
            out[key] = [item[key] for item in items]
    return out


class ImageCodesOnly(LogitsProcessor):
    """Inside the image block only image codes may follow: every other token's score becomes -inf, so
    sampling (or transformers' `generate` with this processor) emits exactly h*w image codes."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.start, self.stop = vocab.code_offset, vocab.size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        out[..., self.start : self.stop] = scores[..., self.start : self.stop]
        return out
