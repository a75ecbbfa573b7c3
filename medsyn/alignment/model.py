"""The dual encoder of `train.py align`: image patches and report words in one shared space.

After "Fine-grained image-text alignment in medical imaging" (ref. [3] of the second seed paper), for CT
volumes (3D) and radiographs (2D) alike:
- `VolumeEncoder`: a strided convolution cuts the image, the 4-channel base-resolution CT volume
  (`spatial_dims=3`) or the 1-channel radiograph (`spatial_dims=2`), into patches of `patch_size` pixels
  per side; transformer layers with fixed sine-cosine position embeddings of the patch grid mix them.
  32^3 with patches of 4 gives 8^3 = 512 patch tokens, 128^2 with patches of 16 gives 8^2 = 64; the grid
  shape maps a token back to its box.
- `ReportEncoder`: the project's BERT-family text encoder (`load_text_model`), frozen or fine-tuned,
  whose wordpiece features are merged into word features (`medsyn.alignment.words`).
- `AlignmentModel`: both projected into a `dim`-wide space and L2-normalised, as patches and words
  (local) and as one vector per volume and per report (global), with learnable temperatures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from medsyn.alignment.words import tokenize_words, word_pooling
from medsyn.conditioning.text import DEFAULT_TEXT_MODEL, load_text_model
from medsyn.config import check_keys, constructor_keys, to_container
from medsyn.errors import ConfigError

POOLS = ("mean", "cls")  # how a report's global feature is pooled: mean of its words, or [CLS]
Grid = tuple[int, ...]  # patch tokens per axis, e.g. (8, 8, 8) or (8, 8)
SPATIAL_DIMS = (2, 3)  # radiographs, CT volumes

# Volume encoder sizes by name (DiT habit); a config's `model` section names one and/or overrides its keys.
PRESETS: dict[str, dict[str, Any]] = {
    "align-tiny": {"patch_size": 4, "stem_channels": 8, "width": 24, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
    "align-demo": {"patch_size": 4, "stem_channels": 16, "width": 96, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
    "align-base": {"patch_size": 8, "stem_channels": 32, "width": 384, "depth": 6, "num_heads": 6, "mlp_ratio": 4.0},
}  # fmt: skip


def sincos_position_embedding(grid: Sequence[int], width: int) -> torch.Tensor:
    """Fixed sine-cosine position embeddings of a patch grid, (prod(grid), width).

    Each axis gets 2 * (width // (2 * len(grid))) channels (sines and cosines of its index at geometric
    frequencies); the channels left over are zero. No parameters, so any grid size works.
    """
    per_axis = 2 * (width // (2 * len(grid)))
    half = per_axis // 2
    freqs = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))  # (half,)
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * freqs  # (P, half)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)  # (P, per_axis * len(grid))
    return F.pad(table, (0, width - table.shape[1])).float()


def patch_box(index: int, grid: Sequence[int], patch_size: int) -> tuple[slice, ...]:
    """The pixel (2D) or voxel (3D) box, one slice per axis, of patch token `index` of a `grid` of
    patches (C order)."""
    position = torch.unravel_index(torch.tensor(int(index)), tuple(grid))
    return tuple(slice(int(i) * patch_size, (int(i) + 1) * patch_size) for i in position)


class VolumeEncoder(nn.Module):
    """Patch tokens of an image: (B, in_channels, *S) -> (B, P, width) and the patch grid, with
    `spatial_dims` axes in S: 3 for CT volumes (D, H, W) -> grid (d, h, w), 2 for radiographs (H, W) ->
    grid (h, w).

    A 3-wide convolution (`stem_channels`) then a `patch_size`-strided convolution make one token per
    patch; `depth` pre-norm transformer layers (`num_heads`, MLP `mlp_ratio` x width, `dropout`) with
    sine-cosine position embeddings relate the patches; a final LayerNorm. Each side of the image
    must be a multiple of `patch_size`. The weights' names do not depend on `spatial_dims`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        patch_size: int = 8,
        stem_channels: int = 32,
        width: int = 384,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
            raise ValueError(f"spatial_dims={spatial_dims!r}: expected 2 (radiographs) or 3 (CT volumes)")
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size), ("width", width),
                            ("stem_channels", stem_channels), ("num_heads", num_heads)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth={depth!r}: expected an integer >= 0")
        if width % num_heads:
            raise ValueError(f"width={width} must be divisible by num_heads={num_heads}")
        if width < 2 * spatial_dims:
            raise ValueError(
                f"width={width}: expected at least {2 * spatial_dims} (two position channels per axis)"
            )
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={mlp_ratio!r}: expected a number > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: expected a number in [0, 1)")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.patch_size, self.width = patch_size, width
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.stem = nn.Sequential(
            conv(in_channels, stem_channels, 3, padding=1),
            nn.GroupNorm(math.gcd(8, stem_channels), stem_channels),
            nn.SiLU(),
            conv(stem_channels, width, patch_size, stride=patch_size),
        )
        layer = nn.TransformerEncoderLayer(width, num_heads, int(mlp_ratio * width), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = (
            nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else nn.Identity()
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_channels:
            axes = "D, H, W" if self.spatial_dims == 3 else "H, W"
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected (B, {self.in_channels}, {axes}) "
                f"(spatial_dims={self.spatial_dims}, in_channels={self.in_channels})"
            )
        sides = tuple(x.shape[2:])
        if any(n % self.patch_size for n in sides):
            raise ValueError(
                f"image of shape {sides}: each side must be a multiple of patch_size={self.patch_size}"
            )
        h = self.stem(x)  # (B, width, *grid)
        grid = tuple(h.shape[2:])
        tokens = h.flatten(2).transpose(1, 2)  # (B, P, width)
        tokens = tokens + sincos_position_embedding(grid, self.width).to(tokens)
        return self.norm(self.blocks(tokens)), grid


@dataclass
class TextFeatures:
    """A batch of encoded reports: word features (B, W, H) zero at padding, word mask (B, W), the pooled
    report feature (B, H), and per report its words as written."""

    words: torch.Tensor
    word_mask: torch.Tensor
    pooled: torch.Tensor
    strings: list[list[str]]


class ReportEncoder(nn.Module):
    """Word and report features of report texts from a BERT-family encoder.

    model: local model directory or hub name (as the base stage's `text.model`); max_length: token
    budget, longer reports are truncated; freeze: keep the encoder fixed (eval mode, no gradients, its
    weights left out of checkpoints and exported weights and reloaded from `model`) or fine-tune it;
    pool: the report feature, "mean" of its word features or the "cls" token's feature.
    """

    def __init__(
        self,
        model: str = DEFAULT_TEXT_MODEL,
        max_length: int = 192,
        freeze: bool = True,
        pool: str = "mean",
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"text.pool={pool!r}: expected one of {', '.join(POOLS)}")
        self.tokenizer, self.encoder = load_text_model(str(model), trust_remote_code, revision)
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ConfigError(f"text.max_length={max_length} exceeds the {limit} positions of {model}")
        self.max_length, self.freeze, self.pool = int(max_length), bool(freeze), pool
        self.hidden_size = int(self.encoder.config.hidden_size)
        if self.freeze:
            self.encoder.requires_grad_(False).eval()
        self.register_state_dict_post_hook(_drop_frozen_encoder)
        self.register_load_state_dict_pre_hook(_keep_frozen_encoder)

    def train(self, mode: bool = True) -> ReportEncoder:
        """A frozen encoder stays in eval mode (no dropout) whatever the caller asks."""
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def forward(self, texts: Sequence[str]) -> TextFeatures:
        inputs, strings, spans = tokenize_words(self.tokenizer, texts, self.max_length)
        device = next(self.encoder.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            tokens = self.encoder(**inputs).last_hidden_state  # (B, L, H)
        pooling, mask = word_pooling(spans, tokens.shape[1], device)  # (B, W, L), (B, W)
        words = pooling.to(tokens.dtype) @ tokens  # (B, W, H)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        else:  # mean of the words; [CLS] for a report without any
            count = mask.sum(1, keepdim=True)  # (B, 1)
            pooled = torch.where(count > 0, words.sum(1) / count.clamp(min=1), tokens[:, 0])  # (B, H)
        return TextFeatures(words, mask, pooled, strings)


def _drop_frozen_encoder(module: ReportEncoder, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a frozen encoder is left out (it is reloaded from `model`)."""
    if module.freeze:
        for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
            del state_dict[key]


def _keep_frozen_encoder(module: ReportEncoder, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state without the frozen encoder's weights keeps the loaded ones."""
    if module.freeze:
        for key, value in module.encoder.state_dict().items():
            state_dict.setdefault(prefix + "encoder." + key, value)


def projection(in_features: int, dim: int) -> nn.Sequential:
    """The head into the shared space: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.GELU(), nn.Linear(dim, dim))


@dataclass
class VolumeEmbedding:
    """Encoded volumes: global (B, D) and patches (B, P, D), L2-normalised, and the patch grid."""

    global_: torch.Tensor
    patches: torch.Tensor
    grid: Grid


@dataclass
class ReportEmbedding:
    """Encoded reports: global (B, D) and words (B, W, D), L2-normalised (zero at padding words), the word
    mask (B, W) and the words as written."""

    global_: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor
    strings: list[list[str]]


class AlignmentModel(nn.Module):
    """Image patches and report words in one `dim`-wide space (the `projection` section's arguments).

    Separate heads project patch tokens, the mean patch token, word features and the pooled report
    feature. `temperature` initialises the two learnable temperatures (global and local logits are
    cosine similarities divided by them; `learn_temperature=False` keeps them fixed); they are kept
    above 0.01 (logit scale at most 100), as CLIP does.
    """

    def __init__(
        self,
        volume: VolumeEncoder,
        text: ReportEncoder,
        dim: int = 256,
        temperature: float = 0.07,
        learn_temperature: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"projection.dim={dim!r}: expected a positive integer")
        if not 0.0 < float(temperature) <= 1.0:
            raise ConfigError(f"projection.temperature={temperature!r}: expected a number in (0, 1]")
        self.volume, self.text = volume, text
        self.patch_head = projection(volume.width, dim)
        self.volume_head = projection(volume.width, dim)
        self.word_head = projection(text.hidden_size, dim)
        self.report_head = projection(text.hidden_size, dim)
        scale = torch.full((2,), math.log(1.0 / float(temperature)))  # (global, local) log logit scales
        self.log_scale = nn.Parameter(scale, requires_grad=bool(learn_temperature))

    @property
    def patch_size(self) -> int:
        return self.volume.patch_size

    @property
    def spatial_dims(self) -> int:
        return self.volume.spatial_dims

    def logit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global, local) logit scales, 1 / temperature, at most 100."""
        scales = self.log_scale.clamp(max=math.log(100.0)).exp()
        return scales[0], scales[1]

    def encode_volumes(self, x: torch.Tensor) -> VolumeEmbedding:
        """(B, C, *S) images (CT volumes: 4 channels, 3 axes; radiographs: 1 channel, 2 axes) in the
        diffusion range -> normalised global (B, D) and patches (B, P, D)."""
        tokens, grid = self.volume(x)  # (B, P, width)
        patches = F.normalize(self.patch_head(tokens), dim=-1)
        global_ = F.normalize(self.volume_head(tokens.mean(1)), dim=-1)
        return VolumeEmbedding(global_, patches, grid)

    def encode_reports(self, texts: Sequence[str]) -> ReportEmbedding:
        """Report texts -> normalised global (B, D) and word (B, W, D) embeddings, word mask (B, W)."""
        feats = self.text(texts)
        words = F.normalize(self.word_head(feats.words), dim=-1) * feats.word_mask[..., None]
        global_ = F.normalize(self.report_head(feats.pooled), dim=-1)
        return ReportEmbedding(global_, words, feats.word_mask, feats.strings)


def volume_encoder_config(spec: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
    """The `VolumeEncoder` arguments of a `model` section: a `preset` (see PRESETS) that its other keys
    override (`spatial_dims` and `in_channels` default to a CT volume's 3 and 4, also for configs saved
    before they existed). Unknown keys and presets are a ConfigError naming them."""
    spec = dict(to_container(spec) or {})
    preset = spec.pop("preset", None)
    check_keys(spec, [*constructor_keys(VolumeEncoder), "preset"], where)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset={preset!r}: unknown; valid presets: {', '.join(PRESETS)}")
        spec = {**PRESETS[preset], **spec}
    return spec


def build_volume_encoder(spec: Mapping[str, Any], where: str = "model") -> VolumeEncoder:
    """A `VolumeEncoder` from a `model` section; bad values are a ConfigError naming the section."""
    try:
        return VolumeEncoder(**volume_encoder_config(spec, where))
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from err


def build_alignment_model(config: Mapping[str, Any]) -> AlignmentModel:
    """The model of an align run config: `model` (volume encoder), `text` (`ReportEncoder` arguments)
    and `projection` (`AlignmentModel` arguments) sections."""
    volume = build_volume_encoder(config["model"])
    text = ReportEncoder(**dict(config["text"]))
    return AlignmentModel(volume, text, **dict(config.get("projection") or {}))
