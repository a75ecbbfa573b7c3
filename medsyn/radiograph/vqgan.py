"""The radiograph VQ-GAN: images <-> grids of codebook indices (the image tokens of `train.py cxr`).

The second seed paper (section 2.2) encodes keypatches with a frozen VQ-GAN encoder and decodes the image
tokens its language model predicts with the VQ-GAN decoder. `VQGAN` wraps MONAI's `VQVAE` (an EMA
codebook, residual encoder and decoder), trained adversarially by `medsyn.training.vqgan` with MONAI's
`PatchDiscriminator`. Its constructor arguments are the keys of a run config's `model` section (a named
preset, see PRESETS, that other keys override); the token grid is configuration: `image_size` / `token_grid`
is the downsampling factor, a power of two reached by the first levels of `channels` (stride 2, kernel 4),
the later levels keep the resolution.

`load_vqgan(run_dir)` rebuilds a trained one from its `model.safetensors` (weights and run config; loading
runs no code) in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import VQVAE
from torch import nn

from medsyn.config import check_keys, constructor_keys, to_container
from medsyn.errors import ConfigError, DataError, MedsynError
from medsyn.weights import WEIGHTS_FILE, load_weights, sha256_file

STAGE = "vqgan"

PRESETS: dict[str, dict[str, Any]] = {
    # tests: 32^2 images, 8x8 tokens
    "vqgan-tiny": {
        "image_size": 32,
        "token_grid": 8,
        "channels": [8, 16],
        "num_res_layers": 1,
        "num_embeddings": 32,
        "embedding_dim": 8,
    },
    # the CPU demo: 128^2 DRRs, 16x16 tokens of 512 codes
    "vqgan-demo": {
        "image_size": 128,
        "token_grid": 16,
        "channels": [32, 64, 64],
        "num_res_layers": 1,
        "num_embeddings": 512,
        "embedding_dim": 32,
    },
    # paper-like (taming-transformers' f16 model): 256^2, 16x16 tokens of 1024 codes
    "vqgan-256": {
        "image_size": 256,
        "token_grid": 16,
        "channels": [128, 128, 256, 256],
        "num_res_layers": 2,
        "num_embeddings": 1024,
        "embedding_dim": 256,
    },
}


class VQGAN(nn.Module):
    """One-channel images in [-1, 1] <-> (token_grid x token_grid) grids of codebook indices."""

    def __init__(
        self,
        image_size: int = 256,
        token_grid: int = 16,
        channels: Sequence[int] = (128, 128, 256, 256),
        num_res_layers: int = 2,
        num_res_channels: Sequence[int] | int | None = None,
        num_embeddings: int = 1024,
        embedding_dim: int = 256,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        embedding_init: str = "normal",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value, low in (("image_size", image_size, 2), ("token_grid", token_grid, 1),
                                 ("num_embeddings", num_embeddings, 2), ("embedding_dim", embedding_dim, 1),
                                 ("num_res_layers", num_res_layers, 0)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
        if image_size % token_grid:
            raise ValueError(f"image_size={image_size}: not divisible by token_grid={token_grid}")
        factor = image_size // token_grid
        levels = factor.bit_length() - 1  # stride-2 levels
        if factor != 2**levels:
            raise ValueError(
                f"image_size={image_size}: image_size / token_grid = {factor}; expected a power of two "
                "(each downsampling level halves the grid)"
            )
        channels = list(channels)
        if levels > len(channels):
            raise ValueError(
                f"channels={channels}: {len(channels)} level(s) cannot downsample {image_size}^2 to "
                f"{token_grid}^2 ({levels} halvings); give at least {levels} levels"
            )
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay!r}: expected a number in (0, 1) (the codebook's EMA decay)")
        down = [(2, 4, 1, 1) if i < levels else (1, 3, 1, 1) for i in range(len(channels))]
        up = [(2, 4, 1, 1, 0) if i < levels else (1, 3, 1, 1, 0) for i in range(len(channels))][::-1]
        self.image_size, self.token_grid, self.downsample = image_size, token_grid, factor
        self.num_codes = num_embeddings
        self.net = VQVAE(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=channels,
            num_res_layers=num_res_layers,
            num_res_channels=channels if num_res_channels is None else num_res_channels,
            downsample_parameters=down,
            upsample_parameters=up,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            epsilon=epsilon,
            embedding_init=embedding_init,
            dropout=dropout,
        )
        self.sha256: str | None = None  # of the weights file, when loaded from a run

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"expected images (B, 1, H, W) with H and W multiples of {self.downsample}; got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct `x` (B, 1, H, W): the reconstruction (B, 1, H, W), unclamped, the commitment loss and
        the encodings (B, E, h, w). In training mode the codebook moves towards the encodings (EMA)."""
        z = self.net.encode(x)  # (B, E, h, w)
        with torch.autocast(x.device.type, enabled=False):  # nearest codes in float32
            loss, quantized = self.net.quantizer(z.float())
        return self.net.decode(quantized), loss, z

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float) -> torch.Tensor:
        """Move the codes whose EMA usage (uses per batch) fell below `threshold` to encodings drawn from
        `z` (B, E, h, w), with a usage of `threshold` (unused in the next batch, they move again); returns
        their indices. Without it an EMA codebook collapses onto the few codes the first encodings fall
        nearest to (the first call places every unused code)."""
        q = self.net.quantizer.quantizer
        dead = (q.ema_cluster_size < threshold).nonzero().flatten()  # (D,)
        if dead.numel():
            flat = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])  # (B*h*w, E)
            new = flat[torch.randint(flat.shape[0], (dead.numel(),)).to(flat.device)]  # (D, E)
            q.embedding.weight.data[dead] = new
            q.ema_w.data[dead] = new * threshold
            q.ema_cluster_size.data[dead] = threshold
        return dead

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [-1, 1] -> code indices (B, H / downsample, W / downsample), int64.
        Leaves the codebook as it is (also in training mode)."""
        self._check(x)
        z = self.net.encode(x.to(self.device, torch.float32))  # (B, E, h, w)
        with torch.autocast(z.device.type, enabled=False):
            _, _, codes = self.net.quantizer.quantizer.quantize(z.float())
        return codes.long()  # (B, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images (B, 1, h * downsample, w * downsample) in [-1, 1]."""
        if codes.ndim != 3 or codes.is_floating_point():
            raise ValueError(f"expected integer codes (B, h, w); got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes outside [0, {self.num_codes}): {int(codes.min())}..{int(codes.max())}")
        quantized = self.net.quantizer.embed(codes.to(self.device, torch.long))  # (B, E, h, w)
        return self.net.decode(quantized).clamp(-1.0, 1.0)

    @property
    def device(self) -> torch.device:
        return self.net.quantizer.quantizer.embedding.weight.device


def vqgan_config(spec: Mapping[str, Any] | str, where: str = "model") -> dict[str, Any]:
    """The `VQGAN` arguments of a `model` section (or a preset name): a `preset` that its other keys
    override. Unknown keys and presets are a ConfigError naming them."""
    spec = {"preset": spec} if isinstance(spec, str) else dict(to_container(spec) or {})
    preset = spec.pop("preset", None)
    check_keys(spec, [*constructor_keys(VQGAN), "preset"], where)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset={preset!r}: unknown; valid presets: {', '.join(PRESETS)}")
        spec = {**PRESETS[preset], **spec}
    return spec


def build_vqgan(spec: Mapping[str, Any] | str, where: str = "model") -> VQGAN:
    """A `VQGAN` from a `model` section; a bad value is a ConfigError naming the key (`model.image_size=...`)."""
    try:
        return VQGAN(**vqgan_config(spec, where))
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        message = " ".join(str(err).split())
        named = message.split("=", 1)[0]
        joint = "." if named.isidentifier() and named in constructor_keys(VQGAN) else ": "
        raise ConfigError(f"{where}{joint}{message}") from err


def load_vqgan(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> VQGAN:
    """The VQ-GAN of a `train.py vqgan` run directory (its `model.safetensors`: weights and run config),
    in eval mode without gradients on `device`; `.sha256` is that of the weights file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such weights file; train the run with `python train.py vqgan` first")
    state, config = load_weights(path)
    if config.get("stage") != STAGE:
        raise DataError(f"{path}: weights of a {config.get('stage')!r} run, not of `train.py vqgan`")
    try:
        model = build_vqgan(config.get("model") or {})
    except MedsynError as err:
        raise DataError(f"{path}: cannot rebuild its model ({err})") from err
    try:
        model.net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"{path}: the weights do not fit the model its config describes ({first})") from err
    model.eval().requires_grad_(False).to(device)
    model.sha256 = sha256_file(path)
    return model
