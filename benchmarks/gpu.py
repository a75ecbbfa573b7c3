"""Paper-scale figures on one CUDA GPU: training steps against the fake-tensor memory estimate, and one
256^3 sample's time by full-volume and windowed SR.

train: the steady-state training step of `benchmarks/memory_estimate.py` (AdamW state exists; two
    micro-batches forward and backward under bf16 autocast, gradient clipping, AdamW foreach), on real
    CUDA tensors: the allocator's peak over one step (torch.cuda.max_memory_allocated, after a warm-up
    step) against the estimate's "peak of the step", and optimizer steps per second (median of --steps
    timed steps; samples/s = 2 micro-batches x batch / step time). Cases: base-700m at B=4 x 64^3 with
    activation checkpointing (as configs/base.yaml) and without, sr-light at B=2 x 96^3 crops (as
    configs/sr.yaml). The EMA copy, DDP buckets and text encoder are outside the step in both figures.
sample: the cascade `sample.py` runs with its defaults (10 DPM-Solver++ base steps with guidance 3, 10 SR
    steps), from configs/base.yaml and configs/sr.yaml with random weights (time and memory do not
    depend on the values) and a randomly initialised BERT-base-shaped text encoder (12 layers of 768,
    built locally: no hub), one sample, each precision and SR mode after a 1-step warm-up: seconds per
    stage and the allocator's peak. MedSyn's 50 + 20 DDIM steps are priced from the same per-step
    times (each base step there is also a guided pair of forwards).

forward: one sr-light forward at 256^3 with cuDNN's autotuner off/on and channels-first/last tensors, and
    the profiler's table of the CUDA ops that take its time.

    python benchmarks/gpu.py [--sections train,sample,forward] [--steps 5] [--estimates F] [--out DIR]
    python benchmarks/gpu.py --estimate-only --out DIR   # the fake-tensor estimates alone (any CPU)

The estimates take a few minutes of CPU; --estimates reads them from an earlier --estimate-only run's
estimates.json. Ends with one JSON line; --out also gets gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_estimate as estimate  # noqa: E402

import medsyn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# (label, preset, activation checkpointing, inputs): the training steps of configs/base.yaml and sr.yaml
TRAIN_CASES = (
    ("base-700m B=4x64^3, checkpointing on", "base-700m", True, lambda: estimate.base_inputs(4, 64)),
    ("base-700m B=4x64^3, checkpointing off", "base-700m", False, lambda: estimate.base_inputs(4, 64)),
    ("sr-light B=2x96^3, checkpointing on", "sr-light", True, lambda: estimate.sr_inputs(2, 96)),
)
MICRO_BATCHES = 2
MEDSYN_STEPS = (50, 20)  # MedSyn's DDIM steps: base (guided), SR


def fake_estimates() -> dict[str, float]:
    """The fake-tensor peak of each training case, in GiB (`memory_estimate.track_training`)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {}
    for label, preset, checkpointing, inputs in TRAIN_CASES:
        peak = estimate.track_training(preset, inputs, checkpointing, micro_batches=MICRO_BATCHES)
        out[label] = peak.total / GIB
        print(f"estimate {label}: {out[label]:.2f} GiB [{peak.seconds:.0f} s]", flush=True)
    return out


def _synchronized(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def train_case(preset: str, checkpointing: bool, inputs: Callable, steps: int) -> dict[str, float]:
    """Real peak memory (GiB) and seconds per optimizer step of the estimate's training step on CUDA."""
    torch.manual_seed(0)
    model = medsyn.build_model(preset, use_checkpointing=checkpointing).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    batch = {k: v.cuda() for k, v in inputs().items()}
    cond = {k: v for k, v in batch.items() if k not in ("x", "t")}

    def step() -> None:
        for _ in range(MICRO_BATCHES):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch["x"], batch["t"], **cond)
                loss = F.mse_loss(out.float(), batch["x"])
            loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW state, cuDNN/cuBLAS handles and kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = [_synchronized(step)]
    peak = torch.cuda.max_memory_allocated() / GIB
    reserved = torch.cuda.max_memory_reserved() / GIB
    seconds += [_synchronized(step) for _ in range(steps - 1)]
    sec = statistics.median(seconds)
    batch_size = batch["x"].shape[0]
    return {
        "peak_gib": peak,
        "reserved_gib": reserved,
        "sec_per_step": sec,
        "steps_per_sec": 1 / sec,
        "samples_per_sec": MICRO_BATCHES * batch_size / sec,
    }


def text_encoder(directory: Path) -> Path:
    """A randomly initialised BERT-base-shaped encoder (12 x 768) with a tokenizer trained on a few reports."""
    from medsyn.conditioning.tiny_bert import build_tiny_bert

    texts = [
        "Large right pleural effusion with adjacent compressive atelectasis. The heart is enlarged.",
        "The lungs are clear. No pleural effusion. Heart size is normal.",
        "Small nodule in the left upper lobe. Emphysematous bullae at the apices.",
    ]
    return build_tiny_bert(
        directory / "bert-base-random", texts, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, vocab_size=200, max_position_embeddings=512,
    )  # fmt: skip


def cascade(directory: Path) -> tuple[SimpleNamespace, SimpleNamespace]:
    """Base and SR stand-ins for `synthesize` (model, grid, factor) from the paper-scale configs."""
    from omegaconf import OmegaConf

    from medsyn.generation.model import build_diffusion_model

    base_config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/base.yaml"), resolve=True)
    base_config["text"]["model"] = str(text_encoder(directory))
    sr_config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/sr.yaml"), resolve=True)
    torch.manual_seed(0)
    base = build_diffusion_model(base_config).cuda().eval()
    sr = build_diffusion_model(sr_config).cuda().eval()
    factor = 4
    base_run = SimpleNamespace(model=base, factor=factor, grid=SimpleNamespace(shape=(64, 64, 64)))
    return base_run, SimpleNamespace(model=sr)


def sample_case(base, sr, precision: str, sr_mode: str) -> dict[str, float]:
    """Seconds of the base stage and of the whole cascade for one 256^3 sample, and the allocator's peak."""
    from medsyn.generation.stages import SampleOptions, synthesize

    prompt = ["Large right pleural effusion with adjacent compressive atelectasis. The heart is enlarged."]
    warm = SampleOptions(steps=1, sr_steps=1, precision=precision, sr_mode=sr_mode)
    synthesize(base, sr, prompt, [0], warm)
    options = SampleOptions(precision=precision, sr_mode=sr_mode)
    base_sec = _synchronized(lambda: synthesize(base, None, prompt, [0], options))
    torch.cuda.reset_peak_memory_stats()
    total = _synchronized(lambda: synthesize(base, sr, prompt, [0], options))
    return {
        "base_sec": base_sec,
        "sr_sec": total - base_sec,
        "total_sec": total,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "steps": options.steps,
        "sr_steps": options.sr_steps,
    }


def forward_variants(size: int = 256, repeats: int = 3) -> dict:
    """Seconds of one no-grad bf16 sr-light forward at size^3 (B=1) with cuDNN's autotuner
    (`torch.backends.cudnn.benchmark`) off/on and channels-first/channels_last_3d tensors, and the
    CUDA ops that take the time (profiler, default variant)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = medsyn.build_model("sr-light").cuda().eval()
    inputs = {k: v.cuda() for k, v in estimate.sr_inputs(1, size).items()}
    x, t = inputs.pop("x"), inputs.pop("t")
    flops = 9.37e12 * (size / 256) ** 3
    out: dict = {}
    print(f"\nsr-light forward at {size}^3, B=1, bf16 autocast, no grad ({flops / 1e12:.2f} TFLOP):")
    for benchmark in (False, True):
        for layout in ("channels_first", "channels_last_3d"):
            torch.backends.cudnn.benchmark = benchmark
            fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
            model.to(memory_format=fmt)
            xs = x.to(memory_format=fmt)
            cond = {k: (v.to(memory_format=fmt) if v.dim() == 5 else v) for k, v in inputs.items()}

            def forward(xs: torch.Tensor = xs, cond: dict = cond) -> None:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model(xs, t, **cond)

            forward()
            forward()  # warm-up (autotuning happens in the first calls)
            sec = statistics.median(_synchronized(forward) for _ in range(repeats))
            label = f"cudnn.benchmark={benchmark} {layout}"
            out[label] = {"sec": sec, "tflops": flops / sec / 1e12}
            print(f"  {label:45} {sec:7.3f} s  {flops / sec / 1e12:6.1f} TFLOP/s", flush=True)
    torch.backends.cudnn.benchmark = False
    model.to(memory_format=torch.contiguous_format)
    x = x.contiguous()
    cond = {k: v.contiguous() for k, v in inputs.items()}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, t, **cond)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(table)
    out["profile"] = table
    return out


def run_section(name: str, fn: Callable[[], dict], summary: dict) -> None:
    """Run one section; a failure (e.g. out of memory) is printed and recorded, and the rest go on."""
    try:
        summary[name] = fn()
    except Exception as err:  # noqa: BLE001 - a benchmark reports every section it can
        traceback.print_exc()
        summary[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        torch.cuda.empty_cache()


def train_section(estimates: dict[str, float], steps: int) -> dict:
    print(
        f"\ntraining step ({MICRO_BATCHES} micro-batches + clipping + AdamW, bf16 autocast, fp32 weights), "
        f"median of {steps}:"
    )
    print(f"{'case':40} {'estimate':>9} {'real peak':>10} {'real/est':>9} {'reserved':>9} {'step s':>8} "
          f"{'steps/s':>8} {'samples/s':>10}")  # fmt: skip
    out = {}
    for label, preset, checkpointing, inputs in TRAIN_CASES:
        result: dict = {}
        run_section("real", lambda p=preset, c=checkpointing, i=inputs: train_case(p, c, i, steps), result)
        torch.cuda.empty_cache()  # the case's model and optimizer are gone with train_case's frame
        real = result["real"]
        real["estimate_gib"] = estimates.get(label)
        out[label] = real
        if "error" in real:
            print(f"{label:40} {real['estimate_gib'] or 0:9.2f} {real['error']}", flush=True)
            continue
        ratio = real["peak_gib"] / real["estimate_gib"] if real["estimate_gib"] else float("nan")
        real["real_over_estimate"] = ratio
        print(
            f"{label:40} {real['estimate_gib'] or float('nan'):9.2f} {real['peak_gib']:10.2f} {ratio:9.3f} "
            f"{real['reserved_gib']:9.2f} {real['sec_per_step']:8.3f} {real['steps_per_sec']:8.2f} "
            f"{real['samples_per_sec']:10.2f}",
            flush=True,
        )
    return out


def sample_section(directory: Path) -> dict:
    base, sr = cascade(directory)
    print("\none 256^3 sample (base 64^3 with guidance 3, SR x4), random weights, batch 1:")
    print(f"{'precision':9} {'SR mode':12} {'base s':>8} {'SR s':>8} {'total s':>8} {'peak GiB':>9} "
          f"{'MedSyn 50+20 s':>15}")  # fmt: skip
    out = {}
    for precision in ("bf16", "32"):
        for mode in ("full", "window"):
            label = f"{precision} {mode}"
            result: dict = {}
            run_section("r", lambda p=precision, m=mode: sample_case(base, sr, p, m), result)
            r = out[label] = result["r"]
            if "error" in r:
                print(f"{precision:9} {mode:12} {r['error']}", flush=True)
                continue
            r["medsyn_steps_sec"] = (
                r["base_sec"] * MEDSYN_STEPS[0] / r["steps"] + r["sr_sec"] * MEDSYN_STEPS[1] / r["sr_steps"]
            )
            print(
                f"{precision:9} {mode + (' 144' if mode == 'window' else ''):12} {r['base_sec']:8.2f} "
                f"{r['sr_sec']:8.2f} {r['total_sec']:8.2f} {r['peak_gib']:9.2f} {r['medsyn_steps_sec']:15.2f}",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", default="train,sample,forward", help="comma-separated: train, sample, forward"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per case")
    parser.add_argument("--estimates", type=Path, help="estimates.json of an earlier --estimate-only run")
    parser.add_argument("--estimate-only", action="store_true", help="compute the fake-tensor estimates only")
    parser.add_argument("--out", type=Path, help="folder for gpu.json / estimates.json")
    args = parser.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.estimate_only:
        estimates = fake_estimates()
        if args.out:
            (args.out / "estimates.json").write_text(json.dumps(estimates, indent=1))
        print(json.dumps({"estimates_gib": {k: round(v, 3) for k, v in estimates.items()}}))
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device; run --estimate-only on a CPU")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, medsyn {medsyn.__version__}")
    summary: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "train" in sections:
        estimates = json.loads(args.estimates.read_text()) if args.estimates else fake_estimates()
        run_section("train", lambda: train_section(estimates, args.steps), summary)
    if "forward" in sections:
        run_section("forward", forward_variants, summary)
    if "sample" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            run_section("sample", lambda: sample_section(Path(tmp)), summary)
    if args.out:
        (args.out / "gpu.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
