"""Count a model's parameters and FLOPs and find where its attention runs, on the meta device.

Nothing here allocates real memory, so paper-scale presets can be inspected on a laptop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medsyn.nn.blocks import SpatialTransformer
from medsyn.nn.unet import UNet


@dataclass
class ModelProfile:
    """Size and cost of one forward pass of a UNet at a given input size."""

    params: int
    flops: int  # multiply-adds count 2 (torch.utils.flop_counter convention)
    input_shape: list[int]
    context_length: int
    attention_levels: list[dict] = field(default_factory=list)  # one entry per attention module
    bottleneck_shape: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _meta_inputs(model: UNet, spatial: list[int], batch: int, context_length: int):
    x = torch.zeros(batch, model.in_channels, *spatial, device="meta")
    t = torch.zeros(batch, device="meta")
    kwargs = {}
    if model.cross_attention_dim is not None:
        kwargs["context"] = torch.zeros(batch, context_length, model.cross_attention_dim, device="meta")
        kwargs["context_mask"] = torch.ones(batch, context_length, dtype=torch.bool, device="meta")
    return x, t, kwargs


def profile_model(
    model: UNet, size: int | list[int], batch: int = 1, context_length: int = 192
) -> ModelProfile:
    """Parameters, FLOPs of one forward pass and attention placement, counted on the meta device.

    The model may live on any device; it is copied to `meta` (no memory) for the count.
    `context_length` is the number of text tokens (MedSyn's code keeps 192).
    """
    spatial = [size] * model.spatial_dims if isinstance(size, int) else list(size)
    meta = model if _is_meta(model) else _to_meta(model)
    x, t, kwargs = _meta_inputs(meta, spatial, batch, context_length)
    levels: list[dict] = []
    shapes: list[list[int]] = []
    hooks = []

    def record(name):
        def hook(module, args):
            levels.append(
                {"module": name, "resolution": list(args[0].shape[2:]), "tokens": int(args[0][0, 0].numel())}
            )

        return hook

    for name, module in meta.named_modules():
        if isinstance(module, SpatialTransformer):
            hooks.append(module.register_forward_pre_hook(record(name)))
    mid = meta.mid_block1.register_forward_pre_hook(lambda m, args: shapes.append(list(args[0].shape[2:])))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta(x, t, **kwargs)
    finally:
        for h in [*hooks, mid]:
            h.remove()
    bottleneck = shapes[0]
    for entry in levels:
        entry["at_bottleneck"] = entry["resolution"] == bottleneck
        entry["level"] = _level_of(entry["resolution"], spatial, meta)
    return ModelProfile(
        params=count_parameters(meta),
        flops=int(counter.get_total_flops()),
        input_shape=[batch, model.in_channels, *spatial],
        context_length=context_length if model.cross_attention_dim is not None else 0,
        attention_levels=levels,
        bottleneck_shape=bottleneck,
    )


def _level_of(resolution: list[int], spatial: list[int], model: UNet) -> int:
    """Resolution level index (0 = input resolution) whose feature size equals `resolution`."""
    size = list(spatial)
    for level, factor in enumerate([(1,) * len(spatial), *model.downsample_factors]):
        size = [-(-s // f) for s, f in zip(size, factor, strict=True)]
        if size == list(resolution):
            return level
    return -1


def _is_meta(model: nn.Module) -> bool:
    return all(p.is_meta for p in model.parameters())


def _to_meta(model: UNet) -> UNet:
    """A memory-free twin of `model`, rebuilt from its constructor arguments."""
    with torch.device("meta"):
        return UNet(**model.config)
