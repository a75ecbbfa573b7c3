"""Report words from wordpieces: which tokens make up each word, and word features as their mean.

A BERT tokenizer splits "effusion" into pieces such as `eff ##usion`; the alignment works on words,
so the pieces of a word are merged back (by the fast tokenizer's word ids) and its feature is the mean
of its pieces' features. [CLS], [SEP], padding and words without a letter or digit (punctuation such as
"." "," "-") are not words here: they carry no anatomy or finding to align with a region.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medsyn.errors import ConfigError

Span = tuple[int, int]  # token positions [start, end) of one word in its tokenized report


def is_word(text: str) -> bool:
    """True for a word with at least one letter or digit (punctuation and symbols alone are not)."""
    return any(c.isalnum() for c in text)


def tokenize_words(
    tokenizer: Any, texts: Sequence[str], max_length: int
) -> tuple[dict[str, torch.Tensor], list[list[str]], list[list[Span]]]:
    """Tokenize reports (padded to the longest, truncated at `max_length` tokens) and find their words.

    Returns the model inputs (`input_ids`, `attention_mask`, ... each (B, L)), and per report the words
    as written in the report and the token span of each. Needs a fast tokenizer (word ids and offsets).
    """
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=int(max_length),
                    return_offsets_mapping=True, return_tensors="pt")  # fmt: skip
    if not getattr(enc, "is_fast", False) or enc.encodings is None:
        raise ConfigError(
            f"text model tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; the "
            "alignment needs its word ids to merge wordpieces into words"
        )
    offsets = enc.pop("offset_mapping").tolist()  # (B, L, 2)
    words, spans = [], []
    for b, text in enumerate(texts):
        ids = enc.word_ids(b)
        report_words, report_spans = [], []
        start = 0
        for i in range(1, len(ids) + 1):
            if i < len(ids) and ids[i] == ids[start]:
                continue
            if ids[start] is not None:
                word = text[offsets[b][start][0] : offsets[b][i - 1][1]]
                if is_word(word):
                    report_words.append(word)
                    report_spans.append((start, i))
            start = i
        words.append(report_words)
        spans.append(report_spans)
    return dict(enc), words, spans


def word_pooling(
    spans: Sequence[Sequence[Span]], length: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Averaging weights that turn token features into word features, and the word mask.

    Returns weights (B, W, L), row w of report b holding 1/n on the n tokens of its word w, and the
    mask (B, W), True where report b has a word w; W is the most words of a report (at least 1). Word
    features are then `weights @ tokens`: (B, W, L) @ (B, L, H) -> (B, W, H), zero at padding words.
    """
    most = max([len(s) for s in spans] + [1])
    weights = torch.zeros(len(spans), most, int(length), device=device)
    mask = torch.zeros(len(spans), most, dtype=torch.bool, device=device)
    for b, report in enumerate(spans):
        for w, (start, end) in enumerate(report):
            weights[b, w, start:end] = 1.0 / (end - start)
            mask[b, w] = True
    return weights, mask
