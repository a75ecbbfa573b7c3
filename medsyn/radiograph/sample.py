"""Sampling image tokens from the report-to-radiograph language model (`medsyn.radiograph.lm`).

`sample_image_codes` continues each condition (`TokenLayout.condition`: instruction, report, keypatch
codes, <|image|>) by exactly h*w image codes, one token at a time with the model's KV cache: only image
codes may be drawn (`ImageCodesOnly`), with temperature and nucleus (top-p) sampling and optional
classifier-free guidance against the unconditional condition (empty report, no keypatches).

Each sample draws from its own `torch.Generator` seeded by its seed, one uniform number per token, and
conditions are left-padded with attention masks and positions counted over real tokens: a sample does
not depend on which others share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from medsyn.radiograph.sequence import ImageCodesOnly, TokenLayout, collate


def check_sampling(temperature: float, top_p: float, guidance: float) -> None:
    """ValueError naming a setting outside its range."""
    if not temperature >= 0.0:
        raise ValueError(
            f"temperature={temperature}: expected a number >= 0 (0: always the most likely code)"
        )
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: expected a number in (0, 1] (1: no nucleus cut)")
    if not guidance >= 0.0:
        raise ValueError(f"guidance={guidance}: expected a scale >= 0 (0: unconditional, 1: no guidance)")


def pick_tokens(
    logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): the most likely at temperature 0, else drawn from the
    softmax at `temperature` restricted to the smallest set of tokens whose probability reaches `top_p`,
    by inverse transform of one uniform number from the row's generator. Returns (B,) long."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(-1)
    keep = (cumulative - sorted_probs) < top_p  # the tokens before which the nucleus is not yet full
    keep[:, 0] = True
    sorted_probs = sorted_probs * keep
    cumulative = sorted_probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    position = torch.searchsorted(cumulative, (u * cumulative[:, -1])[:, None], right=True)  # (B, 1)
    position = position.clamp(max=keep.sum(-1, keepdim=True) - 1)
    return order.gather(-1, position)[:, 0]


@torch.no_grad()
def sample_image_codes(
    model: Any,
    layout: TokenLayout,
    conditions: Sequence[torch.Tensor],
    seeds: Sequence[int],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    guidance: float = 1.0,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """VQ codes (B, h, w) of one image per condition (each (C_i,) ids), sample i drawn with seeds[i].

    guidance: classifier-free guidance scale, logits = uncond + guidance * (cond - uncond) (1: the
    conditional model alone, 0: the unconditional one). callback(t) after each of the h*w tokens.
    """
    check_sampling(temperature, top_p, guidance)
    if len(conditions) != len(seeds):
        raise ValueError(f"got {len(conditions)} conditions but {len(seeds)} seeds; expected one seed each")
    b, device = len(conditions), next(model.parameters()).device
    unconditional = layout.condition([], None)
    rows = list(conditions) if guidance != 0 else []
    rows += [unconditional] * b if guidance != 1 else []
    batch = collate([{"input_ids": r} for r in rows], layout.vocab.pad, side="left")
    mask = batch["attention_mask"].to(device)
    positions = batch["position_ids"][:, -1:].to(device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    only_codes = ImageCodesOnly(layout.vocab)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                position_ids=batch["position_ids"].to(device), use_cache=True)  # fmt: skip
    tokens = []
    for t in range(layout.image_tokens):
        logits = out.logits[:, -1].float()  # (rows, V)
        if 0 < guidance != 1:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + guidance * (cond - uncond)
        token = pick_tokens(only_codes(None, logits), generators, temperature, top_p)  # (B,)
        tokens.append(token)
        if callback is not None:
            callback(t)
        if t == layout.image_tokens - 1:
            break
        step = token.repeat(len(rows) // b)[:, None]  # every row of a sample continues with its token
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        cache = out.past_key_values
        out = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)  # fmt: skip
    return layout.image_codes(torch.stack(tokens, dim=1).cpu())
