"""One training step (forward, backward, AdamW) of the medsyn UNet against MONAI's DiffusionModelUNet.

Both models get the same input (B x 4 x S^3 plus text tokens) and about the same parameter count.
Peak memory (CUDA allocator peak on GPU, peak RSS growth on CPU) is measured for each model in a
fresh process, so that it belongs to that model alone. On CPU that process runs with a fixed glibc
mmap threshold (MALLOC_MMAP_THRESHOLD_=131072): every block above 128 KiB is then its own mapping,
given back when freed, so peak RSS follows the live tensors rather than how the heap happened to
fragment (with glibc's default the same step varies by about 10% from run to run).

Time is measured in one process that takes turns, one step of ours, one of MONAI's, one plain
conv3d 64->64 forward+backward (the roofline reference: what this machine does on the work a UNet
is made of), round after round; the medians are compared, so a machine that is busier in one part
of the run slows all three alike. Each one's fastest round is printed too: on a shared machine,
what a step costs undisturbed (with --threads 1 no step waits on a descheduled worker thread); on
CPU so is the process CPU time of a step, which other processes' load does not add to (with one
thread; with more it includes worker threads spinning at barriers).
Also printed: our achieved FLOP/s as a fraction of the conv3d's, and the FLOPs of one forward pass
of the paper-scale presets, counted on the meta device. The last line is JSON.

    python benchmarks/unet_step.py [--size 32] [--batch 2] [--steps 5] [--device cpu|cuda]
        [--threads N] [--checkpointing] [--scale small|paper] [--precision 32|bf16]

--scale paper compares the base-700m preset (712 M parameters) with a MONAI DiffusionModelUNet of the
same widths (96-192-384-1024, attention at 8^3; 701 M) on 192 text tokens of 768, at 64^3 by default:
a GPU run. --precision bf16 runs both steps under bfloat16 autocast, as `precision: bf16-mixed` trains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

NAMES = ("ours", "monai")
TEXT = {"small": (64, 128), "paper": (192, 768)}  # (tokens, width) of the text context per scale


def _ours(checkpointing: bool = False, scale: str = "small"):
    import medsyn

    if scale == "paper":
        return medsyn.build_model("base-700m", use_checkpointing=checkpointing)
    # a small text-conditioned UNet: widths 32-64-128, attention only at the 8^3 bottleneck
    return medsyn.build_model(
        "base-demo",
        num_channels=[32, 64, 128],
        num_res_blocks=[1, 1, 2],
        norm_num_groups=32,
        cross_attention_dim=TEXT["small"][1],
        use_checkpointing=checkpointing,
    )


def _monai(checkpointing: bool = False, scale: str = "small"):
    from monai.networks.nets import DiffusionModelUNet

    if scale == "paper":
        # base-700m's widths and block counts; MONAI puts one transformer after every residual block of
        # the 8^3 level (2 down, 3 up) and one in its mid-block: 701 M parameters against our 712 M.
        return DiffusionModelUNet(
            spatial_dims=3,
            in_channels=4,
            out_channels=4,
            channels=(96, 192, 384, 1024),
            num_res_blocks=(1, 2, 2, 2),
            attention_levels=(False, False, False, True),
            num_head_channels=64,
            with_conditioning=True,
            cross_attention_dim=TEXT["paper"][1],
            transformer_num_layers=1,
        )

    # Same widths as ours, attention at the bottom level (and MONAI's own attention mid-block);
    # block counts chosen so the parameter counts agree within a few percent (8.97 M vs 9.33 M).
    # MONAI's model has no checkpointing option: it always runs without.
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        channels=(32, 64, 128),
        num_res_blocks=(1, 2, 1),
        attention_levels=(False, False, True),
        num_head_channels=32,
        with_conditioning=True,
        cross_attention_dim=TEXT["small"][1],
        transformer_num_layers=1,
    )


def _step_fn(
    name: str,
    size: int,
    batch: int,
    device: str,
    checkpointing: bool,
    scale: str = "small",
    precision: str = "32",
) -> Callable[[], None]:
    """A model, its AdamW and fixed inputs, as a function running one training step."""
    torch.manual_seed(0)
    model = (_ours if name == "ours" else _monai)(checkpointing, scale).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, size, size, size, device=device)
    t = torch.rand(batch, device=device)
    tokens, width = TEXT[scale]
    ctx = torch.randn(batch, tokens, width, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x, timesteps=t * 1000, context=ctx) if name == "monai" else model(x, t, context=ctx)
        (out.float() - x).square().mean().backward()
        opt.step()

    step.params = sum(p.numel() for p in model.parameters())
    return step


def _conv_fn(size: int, batch: int, device: str, precision: str = "32") -> Callable[[], None]:
    """A plain 64->64 3x3x3 conv3d forward+backward at the models' input size."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(device)
    x = torch.randn(batch, 64, size, size, size, device=device, requires_grad=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            y = conv(x)
        y.float().sum().backward()

    return step


def _flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(
    name: str, size: int, batch: int, device: str, checkpointing: bool, threads: int, queue,
    scale: str = "small", precision: str = "32",
) -> None:  # fmt: skip
    """Params, FLOPs of one step and the peak memory of steady-state steps, in a fresh process."""
    torch.set_num_threads(threads)
    step = _step_fn(name, size, batch, device, checkpointing, scale, precision)
    start_rss = _rss_mb()
    flops = _flops(step)  # forward + backward FLOPs of one step
    step()  # warm-up (allocator, optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of peak RSS over the built model: activations, grads, AdamW state
        peak = _rss_mb() - start_rss
    queue.put({"name": name, "params": step.params, "flops": flops, "peak_mb": peak})


@contextlib.contextmanager
def _malloc_env(device: str) -> Iterator[None]:
    """The environment a CPU memory process starts with: a fixed glibc mmap threshold (see top)."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if device == "cpu":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def measure_time(
    size: int, batch: int, rounds: int, device: str, checkpointing: bool, scale: str = "small",
    precision: str = "32",
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:  # fmt: skip
    """Wall-clock and process CPU seconds of each round's call of ours, MONAI's step and the conv3d,
    taking turns."""
    fns = {name: _step_fn(name, size, batch, device, checkpointing, scale, precision) for name in NAMES}
    fns["conv3d"] = _conv_fn(size, batch, device, precision)
    for fn in fns.values():  # warm-up: allocator, optimizer state, oneDNN/cuDNN kernel choice
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu_times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times


def paper_scale_flops() -> dict[str, tuple[int, int, int]]:
    import medsyn
    from medsyn.nn.inspect import profile_model

    out = {}
    for name, size in (("base-700m", 64), ("sr-light", 256)):
        prof = profile_model(medsyn.build_model(name, device="meta"), size)
        out[name] = (prof.params, prof.flops, size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, default=None, help="input size (default 32; 64 with --scale paper)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--scale", default="small", choices=list(TEXT),
                        help="small: ~9 M-parameter UNets (CPU); paper: base-700m against MONAI at 701 M (GPU)")  # fmt: skip
    parser.add_argument("--precision", default="32", choices=["32", "bf16"],
                        help="bf16: both steps under bfloat16 autocast (as bf16-mixed training)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each: one step of each model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="run our UNet with use_checkpointing=True (default off)"
    )
    args = parser.parse_args()
    if args.size is None:
        args.size = 64 if args.scale == "paper" else 32
    torch.set_num_threads(args.threads)
    setup = (args.scale, args.precision)

    ctx = mp.get_context("spawn")
    results = {}
    for name in NAMES:
        queue = ctx.Queue()
        proc = ctx.Process(
            target=measure_memory,
            args=(name, args.size, args.batch, args.device, args.checkpointing, args.threads, queue, *setup),
        )
        with _malloc_env(args.device):
            proc.start()
        results[name] = queue.get()
        proc.join()
    times, cpu_times = measure_time(
        args.size, args.batch, args.steps, args.device, args.checkpointing, *setup
    )
    sec = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}  # medians: the figures
    best = {name: min(ts) for name, ts in times.items()}  # each one's least disturbed round
    cpu = {name: sorted(ts)[len(ts) // 2] for name, ts in cpu_times.items()}
    ref_flops = _flops(_conv_fn(args.size, args.batch, args.device, args.precision))
    for name in NAMES:
        results[name]["sec"] = sec[name]

    print(
        f"training step, input {args.batch}x4x{args.size}^3 + {TEXT[args.scale][0]} text tokens of "
        f"{TEXT[args.scale][1]}, {args.scale} scale, precision {args.precision}, "
        f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
        f"torch threads {torch.get_num_threads()}, "
        f"our gradient checkpointing {'on' if args.checkpointing else 'off'}, median of {args.steps} rounds"
    )
    print(
        "peak memory: "
        + (
            "CUDA allocator peak"
            if args.device == "cuda"
            else "peak RSS growth, glibc mmap threshold 128 KiB"
        )
    )
    print(f"{'model':8} {'params':>10} {'GFLOP/step':>11} {'s/step':>8} {'peak +MB':>9} {'GFLOP/s':>8}")
    for r in results.values():
        print(
            f"{r['name']:8} {r['params'] / 1e6:9.2f}M {r['flops'] / 1e9:11.1f} {r['sec']:8.3f} "
            f"{r['peak_mb']:9.0f} {r['flops'] / r['sec'] / 1e9:8.1f}"
        )
    ours, monai = results["ours"], results["monai"]
    time_ratio = ours["sec"] / monai["sec"]
    memory_ratio = ours["peak_mb"] / monai["peak_mb"]
    print(
        f"ratio ours/monai: time {time_ratio:.2f}, peak memory {memory_ratio:.2f}, "
        f"params {ours['params'] / monai['params']:.2f}"
    )
    ref = ref_flops / sec["conv3d"]
    achieved = ours["flops"] / ours["sec"]
    roofline = achieved / ref
    print(
        f"conv3d 64->64 fwd+bwd reference: {ref / 1e9:.1f} GFLOP/s ({sec['conv3d']:.3f} s); our step achieves "
        f"{achieved / 1e9:.1f} GFLOP/s = {roofline:.0%} of it"
    )
    # On a shared machine a round can be slowed by other processes; each one's fastest round shows
    # what the step costs when undisturbed. The medians above stay the figures.
    time_ratio_best = best["ours"] / best["monai"]
    roofline_best = (ours["flops"] / best["ours"]) / (ref_flops / best["conv3d"])
    print(
        f"fastest rounds: ours {best['ours']:.3f} s, monai {best['monai']:.3f} s, conv3d {best['conv3d']:.3f} s: "
        f"time ratio {time_ratio_best:.2f}, roofline fraction {roofline_best:.0%}"
    )
    time_ratio_cpu = cpu["ours"] / cpu["monai"]
    roofline_cpu = (ours["flops"] / cpu["ours"]) / (ref_flops / cpu["conv3d"])
    if args.device == "cpu":  # CPU seconds the process used: what other processes' load cannot add to
        print(
            f"process CPU time (medians): ours {cpu['ours']:.3f} s, monai {cpu['monai']:.3f} s, "
            f"conv3d {cpu['conv3d']:.3f} s: time ratio {time_ratio_cpu:.2f}, roofline fraction {roofline_cpu:.0%}"
        )
    for name, (params, flops, size) in paper_scale_flops().items():
        print(
            f"{name}: {params / 1e6:.1f} M parameters, {flops / 1e12:.2f} TFLOP per forward at {size}^3 (meta device)"
        )
    summary = {
        "time_ratio": round(time_ratio, 3),
        "memory_ratio": round(memory_ratio, 3),
        "roofline_fraction": round(roofline, 3),
        "ours_s": round(ours["sec"], 4),
        "monai_s": round(monai["sec"], 4),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "monai_peak_mb": round(monai["peak_mb"], 1),
        "params_ratio": round(ours["params"] / monai["params"], 3),
        "conv3d_gflops": round(ref / 1e9, 1),
        "time_ratio_fastest": round(time_ratio_best, 3),
        "roofline_fraction_fastest": round(roofline_best, 3),
        **(
            {"time_ratio_cpu": round(time_ratio_cpu, 3), "roofline_fraction_cpu": round(roofline_cpu, 3)}
            if args.device == "cpu"
            else {}
        ),
        "checkpointing": args.checkpointing,
        "scale": args.scale,
        "precision": args.precision,
        "device": args.device,
        "memory": "cuda_max_allocated" if args.device == "cuda" else "rss_growth_mmap_threshold_128k",
        "threads": torch.get_num_threads(),
        "size": args.size,
        "batch": args.batch,
        "rounds": args.steps,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
