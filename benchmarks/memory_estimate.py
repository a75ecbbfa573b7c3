"""Peak GPU memory per device of the paper-scale runs (configs/base.yaml, configs/sr.yaml), without a GPU.

Method: the training step runs on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes,
dtypes and storages are tracked, nothing is allocated or computed) under
`torch.distributed._tools.mem_tracker.MemTracker`, a dispatch mode that records the bytes of every live
storage and the peak of their sum, split into parameters, gradients, optimizer state, activations and
temporaries. The step is the one Lightning runs with bf16-mixed and gradient accumulation, in steady
state: AdamW state already exists, two micro-batches run forward and backward (the second one with the
first one's gradients held), then gradient clipping and AdamW (foreach, the CUDA default). Fake CUDA
tensors cannot run autograd on a CPU-only build, so the step runs on fake CPU tensors under CPU bf16
autocast, with layer_norm and group_norm forced to fp32 as CUDA autocast does (CPU autocast would keep
them in bf16). Added on top, counted exactly: the EMA copy of the UNet (fp32 weights, AveragedModel on
the same GPU), DDP's gradient buckets (fp32, the size of the gradients, because gradient_as_bucket_view
is off by default) and the frozen BERT-base text encoder's weights (its no-grad forward is over before
the UNet's starts). Not modelled: the CUDA context, cuDNN/cuBLAS workspaces, the allocator's 512-byte
rounding and fragmentation; they are what the headroom is for. Cross-check: on a tiny preset, fake and
real CPU tensors give the same peak to within 2% (tests/test_memory_estimate.py).

    python benchmarks/memory_estimate.py [--gpu-gb 48] [--headroom 0.10]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

import medsyn

GIB = 2**30
TEXT_LEN, TEXT_DIM = 192, 768

Inputs = dict[str, torch.Tensor]


@contextlib.contextmanager
def cuda_norm_policy() -> Iterator[None]:
    """Run group_norm and layer_norm in fp32 under CPU autocast, as CUDA autocast does.

    CUDA autocast casts their inputs to fp32 and returns fp32; CPU autocast leaves them in bf16, which
    would halve the normalized activations saved for backward and under-estimate the GPU peak. The
    functions are swapped in `torch.nn.functional` (where nn.GroupNorm and nn.LayerNorm look them up)
    rather than through a TorchFunctionMode, because activation checkpointing recomputes inside
    backward, where such a mode is not active.
    """
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

    def fp32(v: object) -> object:
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def wrap(func: Callable) -> Callable:
        def run(*args: object, **kwargs: object) -> torch.Tensor:
            if not torch.is_autocast_enabled("cpu"):
                return func(*args, **kwargs)
            with torch.autocast("cpu", enabled=False):
                return func(*[fp32(a) for a in args], **{k: fp32(v) for k, v in kwargs.items()})

        return run

    try:
        for name, func in originals.items():
            setattr(F, name, wrap(func))
        yield
    finally:
        for name, func in originals.items():
            setattr(F, name, func)


def base_inputs(batch: int, size: int) -> Inputs:
    """Inputs of the text-conditioned base model: x (B, 4, S, S, S), t (B,), 192 BERT tokens."""
    return {
        "x": torch.randn(batch, 4, size, size, size),
        "t": torch.rand(batch),
        "context": torch.randn(batch, TEXT_LEN, TEXT_DIM),
        "context_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool),
    }


def sr_inputs(batch: int, size: int) -> Inputs:
    """Inputs of the SR model: x and the upsampled low-resolution volume, each (B, 4, S, S, S)."""
    return {
        "x": torch.randn(batch, 4, size, size, size),
        "t": torch.rand(batch),
        "concat": torch.randn(batch, 4, size, size, size),
        "aug_t": torch.rand(batch) * 0.2,
    }


@dataclass
class Peak:
    """Peak of tracked memory (bytes) and the breakdown at that moment, by MemTracker category."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)
    params: int = 0  # bytes of the parameters (fp32) and buffers
    seconds: float = 0.0

    def part(self, *names: str) -> int:
        return sum(self.parts.get(n, 0) for n in names)


def _peak(tracker: MemTracker) -> dict[str, int]:
    snap = tracker.get_tracker_snapshot("peak")
    parts: dict[str, int] = {}
    for dev_snap in snap.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", str(key))
            parts[name] = parts.get(name, 0) + int(value)
    return parts


def _scope(fake: bool) -> contextlib.AbstractContextManager:
    return FakeTensorMode() if fake else contextlib.nullcontext()


def track_training(
    preset: str,
    inputs: Callable[[], Inputs],
    checkpointing: bool,
    fake: bool = True,
    micro_batches: int = 2,
    **overrides,
) -> Peak:
    """Peak memory of steady-state training: optimizer state exists, gradients accumulate over
    `micro_batches` forward/backward passes, then gradient clipping and AdamW."""
    start = time.perf_counter()
    with _scope(fake):
        torch.manual_seed(0)
        model = medsyn.build_model(preset, use_checkpointing=checkpointing, **overrides).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
        for p in params:  # AdamW state as after the first step: exp_avg, exp_avg_sq, step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = inputs()
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *batch.values())

        def micro_step() -> None:
            tracker.reset_mod_stats()  # per-module stats only; the global peak is kept
            x = batch["x"]
            cond = {k: v for k, v in batch.items() if k not in ("x", "t")}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, batch["t"], **cond)  # (B, 4, *S)
                loss = F.mse_loss(out.float(), x)
            loss.backward()

        def optimizer_step() -> None:
            nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with tracker, cuda_norm_policy():
            for _ in range(micro_batches):
                micro_step()
            optimizer_step()
        weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    parts = _peak(tracker)
    return Peak(parts.pop("Total"), parts, weights, time.perf_counter() - start)


def track_sampling(preset: str, inputs: Callable[[], Inputs], fake: bool = True, **overrides) -> Peak:
    """Peak memory of one no-grad bf16-autocast forward pass (fp32 weights, as trained)."""
    start = time.perf_counter()
    with _scope(fake):
        model = medsyn.build_model(preset, **overrides).eval()
        batch = inputs()
        tracker = MemTracker()
        tracker.track_external(model, *batch.values())
        with tracker, torch.no_grad(), cuda_norm_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
            x = batch.pop("x")
            model(x, batch.pop("t"), **batch)
        weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    parts = _peak(tracker)
    return Peak(parts.pop("Total"), parts, weights, time.perf_counter() - start)


def text_encoder_params() -> int:
    """Parameters of the frozen BERT-base encoder (as loaded: no pooler), counted on the meta device."""
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        encoder = BertModel(BertConfig(), add_pooling_layer=False)
    return sum(p.numel() for p in encoder.parameters())


def gib(n: float) -> str:
    return f"{n / GIB:7.2f}"


def training_table(
    name: str, off: Peak, on: Peak, text_bytes: int, budget: float, capacity: float
) -> list[str]:
    """Rows per component for checkpointing off and on; the total is the tracked peak plus the
    resident extras (EMA, DDP buckets, text encoder)."""
    rows = [
        ("parameters (fp32)", lambda p: p.part("Parameter", "Buffer")),
        ("gradients (fp32)", lambda p: p.part("Gradient")),
        ("AdamW exp_avg + exp_avg_sq (fp32)", lambda p: p.part("Optstate")),
        ("activations + temporaries", lambda p: p.part("Activation", "Temp")),
        ("inputs", lambda p: p.part("Other")),
        ("= tracked step peak", lambda p: p.total),
        ("EMA copy of the UNet (fp32)", lambda p: p.params),
        ("DDP gradient buckets (fp32)", lambda p: p.params),
        ("text encoder weights (fp32)", lambda p: text_bytes),
    ]
    lines = [f"{name}: GiB per GPU at the peak{'':14}ckpt off  ckpt on"]
    for label, get in rows:
        lines.append(f"  {label:46}{gib(get(off))}  {gib(get(on))}")
    totals = [p.total + 2 * p.params + text_bytes for p in (off, on)]
    lines.append(f"  {'TOTAL per GPU':46}{gib(totals[0])}  {gib(totals[1])}")
    verdict = ["fits" if t <= budget else ("tight" if t <= capacity else "NO") for t in totals]
    lines.append(
        f"  {'fits in ' + f'{budget / GIB:.1f}' + ' GiB budget?':46}{verdict[0]:>7}  {verdict[1]:>7}"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gb", type=float, default=48.0, help="GPU memory in GB (10^9 bytes)")
    parser.add_argument(
        "--headroom", type=float, default=0.10, help="fraction kept for context/fragmentation"
    )
    args = parser.parse_args(argv)
    capacity = args.gpu_gb * 1e9
    budget = capacity * (1 - args.headroom)
    torch.set_num_threads(1)
    start = time.perf_counter()

    bert = text_encoder_params()
    text_fp32, text_bf16 = 4 * bert, 2 * bert
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    print()
    print(
        f"GPU: {args.gpu_gb:g} GB = {capacity / GIB:.2f} GiB; budget with {args.headroom:.0%} headroom "
        f"{budget / GIB:.2f} GiB. Text encoder: BERT-base, {bert / 1e6:.1f} M params = "
        f"{text_fp32 / GIB:.2f} GiB fp32 (as TextConditioner loads it) / {text_bf16 / GIB:.2f} GiB bf16."
    )

    base = {c: track_training("base-700m", lambda: base_inputs(4, 64), c) for c in (False, True)}
    n_base = base[False].params // 4
    print(
        f"\nbase-700m ({n_base / 1e6:.0f} M params), B=4 x 4 x 64^3, text 192 x 768 "
        f"[{base[False].seconds + base[True].seconds:.0f} s]"
    )
    print("\n".join(training_table("base", base[False], base[True], text_fp32, budget, capacity)))

    sr = {c: track_training("sr-light", lambda: sr_inputs(2, 96), c) for c in (False, True)}
    n_sr = sr[False].params // 4
    print(
        f"\nsr-light ({n_sr / 1e6:.0f} M params), B=2 x (4+4) x 96^3, no text "
        f"[{sr[False].seconds + sr[True].seconds:.0f} s]"
    )
    print("\n".join(training_table("sr", sr[False], sr[True], 0, budget, capacity)))

    print("\nsr-light sampling, one no-grad forward, bf16 autocast, fp32 weights, B=1:")
    for label, size in (("full volume 256^3", 256), ("sliding-window patch 64^3", 64)):
        peak = track_sampling("sr-light", lambda s=size: sr_inputs(1, s))
        acts = peak.part("Activation", "Temp")
        print(
            f"  {label:30} peak {gib(peak.total)} GiB (weights {gib(peak.part('Parameter', 'Buffer')).strip()}, "
            f"inputs {gib(peak.part('Other')).strip()}, activations {gib(acts).strip()}) [{peak.seconds:.0f} s]"
        )
    volume = 4 * 4 * 256**3
    print(
        f"  plus the sampler's own fp32 volumes at 256^3 (x, x0 and the previous x0 for a 2nd-order "
        f"sampler; sliding window: output sum and weight map): {gib(3 * volume).strip()} GiB"
    )
    print(f"\n[{time.perf_counter() - start:.0f} s in all]")


if __name__ == "__main__":
    main()
