"""`medsyn summary PRESET`: parameters, FLOPs per forward pass and attention placement (meta device)."""

from __future__ import annotations

import argparse
import json

from medsyn.errors import ConfigError
from medsyn.nn.build import build_model
from medsyn.nn.inspect import profile_model
from medsyn.nn.presets import DEFAULT_SIZE, PRESETS

HELP = "Count a model's parameters and FLOPs per forward pass on the meta device (no memory used)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="PRESET", help=f"a preset ({', '.join(PRESETS)}) or a model YAML file"
    )
    parser.add_argument("--size", type=int, help="input edge length in voxels (default: the preset's own)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--context-length", type=int, default=192, help="text tokens (default 192)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    model = build_model(args.model, device="meta")
    size = args.size if args.size is not None else DEFAULT_SIZE.get(args.model)
    if size is None:
        raise ConfigError(f"--size is needed for '{args.model}' (it is not a preset with a default size)")
    if size < 1 or args.batch < 1 or args.context_length < 1:
        raise ConfigError(
            f"--size, --batch and --context-length must be positive, got {size}, {args.batch}, {args.context_length}"
        )
    profile = profile_model(model, size, batch=args.batch, context_length=args.context_length)
    if args.json:
        out = {"model": args.model, **profile.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    shape = "x".join(map(str, profile.input_shape))
    print(f"model            {args.model}")
    print(
        f"input            {shape}"
        + (f" + {profile.context_length} text tokens" if profile.context_length else "")
    )
    print(f"parameters       {profile.params:,} ({profile.params / 1e6:.1f} M)")
    scaled = (
        f"{profile.flops / 1e12:.2f} TFLOP" if profile.flops >= 1e12 else f"{profile.flops / 1e9:.1f} GFLOP"
    )
    print(f"FLOPs / forward  {profile.flops:,} ({scaled})")
    print(f"bottleneck       {'x'.join(map(str, profile.bottleneck_shape))}")
    for entry in profile.attention_levels:
        res = "x".join(map(str, entry["resolution"]))
        where = "bottleneck" if entry["at_bottleneck"] else f"level {entry['level']}"
        print(f"attention        {entry['module']} at {res} ({entry['tokens']} tokens, {where})")
    if not profile.attention_levels:
        print("attention        none")
    return 0
