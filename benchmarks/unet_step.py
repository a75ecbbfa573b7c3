"""One training step (forward, backward, AdamW) of the medsyn UNet against MONAI's DiffusionModelUNet.

Both models get the same input (B x 4 x S^3 plus text tokens) and about the same parameter count.
Each is measured in a fresh process so that peak memory (CUDA allocator peak on GPU, peak RSS
growth on CPU) belongs to that model alone. Also printed: the achieved FLOP/s of our step as a
fraction of a plain conv3d forward+backward on the same machine in the same run, and the FLOPs of
one forward pass of the paper-scale presets, counted on the meta device.

    python benchmarks/unet_step.py [--size 32] [--batch 2] [--steps 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

TEXT_DIM, TEXT_LEN = 128, 64


def _ours():
    import medsyn

    # a small text-conditioned UNet: widths 32-64-128, attention only at the 8^3 bottleneck
    return medsyn.build_model(
        "base-demo",
        num_channels=[32, 64, 128],
        num_res_blocks=[1, 1, 2],
        norm_num_groups=32,
        cross_attention_dim=TEXT_DIM,
    )


def _monai():
    from monai.networks.nets import DiffusionModelUNet

    # Same widths as ours, attention at the bottom level (and MONAI's own attention mid-block);
    # block counts chosen so the parameter counts agree within a few percent (8.97 M vs 9.33 M).
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        channels=(32, 64, 128),
        num_res_blocks=(1, 2, 1),
        attention_levels=(False, False, True),
        num_head_channels=32,
        with_conditioning=True,
        cross_attention_dim=TEXT_DIM,
        transformer_num_layers=1,
    )


def _call(name, model, x, t, ctx):
    if name == "monai":
        return model(x, timesteps=t * 1000, context=ctx)
    return model(x, t, context=ctx)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, size: int, batch: int, steps: int, device: str, queue) -> None:
    torch.manual_seed(0)
    model = (_ours if name == "ours" else _monai)().to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, size, size, size, device=device)
    t = torch.rand(batch, device=device)
    ctx = torch.randn(batch, TEXT_LEN, TEXT_DIM, device=device)

    start_rss = _rss_mb()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (_call(name, model, x, t, ctx) - x).square().mean()
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:  # forward + backward FLOPs of one step
        step()
    flops = counter.get_total_flops()
    step()  # warm-up (allocator, optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (
            _rss_mb() - start_rss
        )  # growth of peak RSS over the built model: activations, grads, AdamW state
    sec = sorted(times)[len(times) // 2]
    queue.put({"name": name, "params": params, "sec": sec, "peak_mb": peak, "flops": flops})


def conv_reference(size: int, batch: int, device: str, repeats: int = 5) -> float:
    """FLOP/s of a plain 64->64 3x3x3 conv3d forward+backward: what this machine can do."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(device)
    x = torch.randn(batch, 64, size, size, size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    flops = counter.get_total_flops()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        conv(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return flops / sorted(times)[len(times) // 2]


def paper_scale_flops() -> dict[str, float]:
    import medsyn
    from medsyn.nn.inspect import profile_model

    out = {}
    for name, size in (("base-700m", 64), ("sr-light", 256)):
        prof = profile_model(medsyn.build_model(name, device="meta"), size)
        out[name] = (prof.params, prof.flops, size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    results = {}
    for name in ("ours", "monai"):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(name, args.size, args.batch, args.steps, args.device, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    ref = conv_reference(args.size, args.batch, args.device)

    print(
        f"training step, input {args.batch}x4x{args.size}^3 + {TEXT_LEN} text tokens of {TEXT_DIM}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'model':8} {'params':>10} {'GFLOP/step':>11} {'s/step':>8} {'peak +MB':>9} {'GFLOP/s':>8}")
    for r in results.values():
        print(
            f"{r['name']:8} {r['params'] / 1e6:9.2f}M {r['flops'] / 1e9:11.1f} {r['sec']:8.3f} "
            f"{r['peak_mb']:9.0f} {r['flops'] / r['sec'] / 1e9:8.1f}"
        )
    ours, monai = results["ours"], results["monai"]
    print(
        f"ratio ours/monai: time {ours['sec'] / monai['sec']:.2f}, peak memory "
        f"{ours['peak_mb'] / monai['peak_mb']:.2f}, params {ours['params'] / monai['params']:.2f}"
    )
    achieved = ours["flops"] / ours["sec"]
    print(
        f"conv3d 64->64 fwd+bwd reference: {ref / 1e9:.1f} GFLOP/s; our step achieves "
        f"{achieved / 1e9:.1f} GFLOP/s = {achieved / ref:.0%} of it"
    )
    for name, (params, flops, size) in paper_scale_flops().items():
        print(
            f"{name}: {params / 1e6:.1f} M parameters, {flops / 1e12:.2f} TFLOP per forward at {size}^3 (meta device)"
        )


if __name__ == "__main__":
    main()
