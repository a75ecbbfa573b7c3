"""The frozen text conditioner: report strings -> token features and mask for cross-attention (paper IV.A).

MedSyn encodes the Findings and Impression sections with a BERT fine-tuned from CXR-BERT and keeps it
frozen while the diffusion UNet trains. As in sgm's frozen embedders, the conditioner freezes itself
and owns the condition dropout used for classifier-free guidance, and the null condition sampling uses.

CXR-BERT (the default name) offline: run `hf download microsoft/BiomedVLP-CXR-BERT-specialized
--local-dir DIR` where the hub is reachable and set the model to DIR. Its config declares a custom
model type ("cxr-bert") whose classes live in the repository; its BERT backbone (the "bert." weights)
loads here as a plain `BertModel` without running that code, and the projection head it adds is not
needed for token features. trust_remote_code=True loads the repository's class instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsyn.conditioning import features as fcache
from medsyn.errors import ConfigError, DataError

DEFAULT_TEXT_MODEL = "microsoft/BiomedVLP-CXR-BERT-specialized"  # CXR-BERT, as in the paper
NULL_KINDS = ("zero", "learned", "empty")
PADDINGS = ("longest", "max_length")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
Cond = dict[str, torch.Tensor]


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    """A list of report strings (a bare string is one report)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("the text conditioner needs at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is a {type(t).__name__}, expected str")
    return texts


def _pad(cond: Cond, length: int) -> Cond:
    """Pad context (B, L, H) and mask (B, L) with zeros / False up to `length` tokens."""
    extra = length - cond["context"].shape[1]
    if extra <= 0:
        return dict(cond)
    return {
        "context": nn.functional.pad(cond["context"], (0, 0, 0, extra)),
        "context_mask": nn.functional.pad(cond["context_mask"], (0, extra), value=False),
    }


def hub_offline() -> bool:
    """True when the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def looks_like_path(name: str) -> bool:
    """A name that can only mean a filesystem location, never a hub repository id."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1


def _not_found(name: str, reason: str) -> DataError:
    where = (
        "the model hub is unreachable offline (HF_HUB_OFFLINE=1)"
        if hub_offline()
        else "a path cannot be fetched from the model hub"
    )
    return DataError(
        f"text model {name!r} not found: {reason}, and {where}. Point the text model setting to a "
        "local directory with config.json, the tokenizer files and the weights (for example one written by "
        "medsyn.conditioning.tiny_bert.build_tiny_bert, or `hf download REPO --local-dir DIR` run where the hub is reachable)"
    )


def load_text_model(
    name: str, trust_remote_code: bool = False, revision: str | None = None
) -> tuple[Any, nn.Module]:
    """(tokenizer, BERT backbone) from a local model directory or a hub name, errors naming the source.

    Unknown BERT-like model types (CXR-BERT's "cxr-bert", whose repository ships its own classes) load
    as a plain `BertModel` from the "bert."-prefixed weights unless trust_remote_code is set.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DataError(f"text model directory {path} has no config.json (not a Hugging Face model)")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise DataError(
                f"text model directory {path} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})"
            )
        source = str(path)
    elif path.exists():
        raise DataError(f"text model {name!r} is a file; expected a model directory or a hub name")
    elif looks_like_path(name):
        raise _not_found(name, "there is no such directory")
    else:
        source = name
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        raw, _ = PretrainedConfig.get_config_dict(source, **kwargs)
        model_type = str(raw.get("model_type", ""))
        if trust_remote_code or model_type in CONFIG_MAPPING:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
            model = AutoModel.from_pretrained(
                source, config=config, trust_remote_code=trust_remote_code, **kwargs
            )
        elif "bert" in model_type:
            config = BertConfig.from_pretrained(source, **kwargs)
            model = BertModel.from_pretrained(source, config=config, add_pooling_layer=False, **kwargs)
        else:
            raise ConfigError(
                f"text model {name!r} has model_type {model_type!r}, unknown to transformers and not BERT-like; "
                "set trust_remote_code=True to run the repository's own model code"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        except (ValueError, KeyError):  # a tokenizer class transformers cannot resolve: BERT's will do
            from transformers import BertTokenizerFast

            tokenizer = BertTokenizerFast.from_pretrained(source, **kwargs)
    except OSError as err:
        if source == name and not path.is_dir():
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise _not_found(name, f"it is neither a local directory nor in the hub cache ({first})") from err
        raise DataError(f"cannot load text model from {source}: {err}") from err
    backbone = getattr(model, "base_model", model)  # a model with a head (CXRBertModel, MLM) -> its BERT
    if len(tokenizer) > backbone.config.vocab_size:
        raise DataError(
            f"text model {name!r}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{backbone.config.vocab_size}; tokenizer and weights do not belong together"
        )
    return tokenizer, backbone


class TextConditioner(nn.Module):
    """A frozen BERT-family encoder giving {"context": (B, L, H) float32, "context_mask": (B, L) bool}.

    model: local model directory or hub name. A config whose model_type transformers does not know
        but which is BERT-like (CXR-BERT's "cxr-bert") loads as its BERT backbone without running the
        repository's code; trust_remote_code=True loads the repository's own class instead, whose
        `base_model` (the BERT backbone) is used. Either way only the token features are needed.
    max_length: token budget (the paper's code keeps 192); longer reports are truncated.
    padding: "longest" pads to the longest text in the batch, "max_length" always to max_length.
    ucg_rate: probability that a training sample's condition is replaced by the null condition.
    null_kind: "zero" (zero features, only the first token valid so attention is defined), "learned"
        (a trainable (null_length, H) parameter, all tokens valid) or "empty" (the encoding of "").
    cache_size: entries of the per-text LRU feature cache used by `encode` (0 disables it).
    save_encoder: keep the frozen encoder's weights in `state_dict` (by default they are left out
        and reloaded from `model`, so checkpoints and EMA copies hold only what trains).
    """

    key = "text"  # the batch entry it conditions on: a list of report strings

    def __init__(
        self,
        model: str = DEFAULT_TEXT_MODEL,
        max_length: int = 192,
        padding: str = "longest",
        ucg_rate: float = 0.1,
        null_kind: str = "zero",
        null_length: int = 1,
        cache_size: int = 256,
        trust_remote_code: bool = False,
        revision: str | None = None,
        save_encoder: bool = False,
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ConfigError(f"text padding must be one of {PADDINGS}, got {padding!r}")
        if null_kind not in NULL_KINDS:
            raise ConfigError(f"text null_kind must be one of {NULL_KINDS}, got {null_kind!r}")
        if not 0.0 <= ucg_rate <= 1.0:
            raise ConfigError(f"text ucg_rate must be in [0, 1], got {ucg_rate}")
        if max_length < 2:
            raise ConfigError(f"text max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        if not 1 <= null_length <= max_length:
            raise ConfigError(f"text null_length must be in [1, max_length={max_length}], got {null_length}")
        self.model_name = str(model)
        self.tokenizer, encoder = load_text_model(
            model, trust_remote_code=trust_remote_code, revision=revision
        )
        limit = getattr(encoder.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ConfigError(f"text max_length {max_length} exceeds the {limit} positions of {model}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.hidden_size = int(encoder.config.hidden_size)
        self.max_length, self.padding, self.ucg_rate, self.null_kind = (
            max_length,
            padding,
            float(ucg_rate),
            null_kind,
        )
        self.save_encoder = save_encoder
        self._cache = fcache.FeatureCache(cache_size)
        if null_kind == "learned":
            self.null_context = nn.Parameter(torch.randn(null_length, self.hidden_size) * 0.02)  # (L0, H)
        elif null_kind == "empty":
            empty = self.encode([""])
            self.register_buffer(
                "empty_context", empty["context"][0, empty["context_mask"][0]], persistent=False
            )
        self.register_state_dict_post_hook(_drop_encoder_weights)
        self.register_load_state_dict_pre_hook(_keep_encoder_weights)
        self.train(False)

    def train(self, mode: bool = True) -> TextConditioner:
        """Stay in eval mode: the encoder is frozen (no dropout), whatever the caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, hidden_size={self.hidden_size}, max_length={self.max_length}, "
            f"padding={self.padding!r}, null_kind={self.null_kind!r}, ucg_rate={self.ucg_rate}"
        )

    @torch.no_grad()
    def _features(self, text: str) -> torch.Tensor:
        """Last-layer token features (L_i, H) of one text, unpadded. One text per encoder call: batched,
        padded matmuls differ in the last bits, so a text's features never depend on its companions."""
        tokens = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        names = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {k: v.to(self.device) for k, v in tokens.items() if k in names}
        return self.encoder(**inputs).last_hidden_state.float()[0]  # (L_i, H)

    def _length(self, longest: int) -> int:
        """The batch length: max_length under "max_length" padding, else the longest text."""
        return self.max_length if self.padding == "max_length" else max(longest, 1)

    def encode(self, texts: str | Sequence[str]) -> Cond:
        """Token features (zero at padding) and mask of each report, without condition dropout.

        The one route from text to features, in training and sampling alike: each text is encoded on
        its own (memoized in the LRU cache when `cache_size` > 0), then the batch is padded.
        """
        texts = _as_texts(texts)
        found: dict[str, torch.Tensor] = {}
        for t in dict.fromkeys(texts):
            item = self._cache.get(t) if self._cache.maxsize else None
            if item is None:
                item = self._features(t)
                self._cache.put(t, item)
            found[t] = item
        feats = [found[t].to(self.device) for t in texts]
        return fcache.collate(feats, self._length(max(f.shape[0] for f in feats)))

    def cache_info(self) -> fcache.CacheInfo:
        """(hits, misses, size, maxsize) of the feature cache, counted per distinct text per call."""
        return self._cache.info()

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(
        self, texts: str | Sequence[str], *, train: bool = False, generator: torch.Generator | None = None
    ) -> Cond:
        """Network conditioning of reports; in training (`train=True`) with condition dropout."""
        cond = self.encode(texts)
        return self.apply_ucg(cond, generator) if train else cond

    def unconditional(self, cond: Cond) -> Cond:
        """The null condition shaped like `cond` (the unconditional branch of classifier-free guidance)."""
        return self.null_condition(cond["context"].shape[0], length=cond["context"].shape[1])

    def unet_arguments(self) -> dict[str, Any]:
        """UNet constructor arguments this conditioner fixes: the width of its token features."""
        return {"cross_attention_dim": self.hidden_size}

    def _null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpadded null condition: features (L0, H) and mask (L0,)."""
        if self.null_kind == "learned":
            ctx = self.null_context
        elif self.null_kind == "empty":
            ctx = self.empty_context
        else:
            ctx = torch.zeros(1, self.hidden_size, device=self.device)
        return ctx, torch.ones(ctx.shape[0], dtype=torch.bool, device=ctx.device)

    def null_condition(self, batch_size: int, length: int | None = None) -> Cond:
        """The null condition for `batch_size` samples (the unconditional branch of CFG).

        `length` (default: max_length with "max_length" padding, else the null's own length) pads it
        to match a conditional batch, so both run as one batched forward.
        """
        ctx, mask = self._null()
        length = self._length(ctx.shape[0]) if length is None else length
        if length < ctx.shape[0]:
            raise ValueError(
                f"the {self.null_kind} null condition has {ctx.shape[0]} tokens, more than {length}"
            )
        null = _pad({"context": ctx[None], "context_mask": mask[None]}, length)
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in null.items()}

    def apply_ucg(
        self, cond: Cond, generator: torch.Generator | None = None, rate: float | None = None
    ) -> Cond:
        """Replace each sample's condition by the null one with probability `rate` (default ucg_rate).

        One uniform draw per sample from `generator` (or the global RNG), so a seeded generator gives
        the same choice for the same batch. The learned null enters the graph even when no sample is
        dropped, so distributed training never sees it as an unused parameter.
        """
        rate = self.ucg_rate if rate is None else rate
        context = cond["context"]  # (B, L, H)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        drop = torch.rand(context.shape[0], generator=generator, device=draw_device) < rate  # (B,)
        drop = drop.to(context.device)
        length = max(context.shape[1], self._null()[0].shape[0])
        cond = _pad(cond, length)
        null = self.null_condition(context.shape[0], length)
        return {
            "context": torch.where(drop[:, None, None], null["context"].to(context.dtype), cond["context"]),
            "context_mask": torch.where(drop[:, None], null["context_mask"], cond["context_mask"]),
        }

    @torch.no_grad()
    def precompute(self, texts: Sequence[str], path: str | os.PathLike) -> Path:
        """Encode a fixed report set once and write it to a safetensors file keyed by sha1 of each text."""
        unique = list(dict.fromkeys(_as_texts(texts)))
        feats = {t: self._features(t) for t in unique}  # (L_i, H) each, exactly as `encode` computes them
        meta = {"model": self.model_name, "max_length": self.max_length, "hidden_size": self.hidden_size}
        return fcache.save_features(path, feats, meta)

    def load_precomputed(self, texts: str | Sequence[str], path: str | os.PathLike) -> Cond:
        """The batch condition for `texts` from a file written by `precompute` (no encoder pass)."""
        meta = fcache.read_metadata(path)
        for key in ("hidden_size", "max_length"):
            if meta.get(key) != str(getattr(self, key)):
                raise ConfigError(
                    f"text feature file {path} was written with {key}={meta.get(key)} (model "
                    f"{meta.get('model')!r}); this conditioner has {key}={getattr(self, key)}"
                )
        feats = [f.to(self.device) for f in fcache.load_features(path, _as_texts(texts))]
        return fcache.collate(feats, self._length(max(f.shape[0] for f in feats)))


def _drop_encoder_weights(
    module: TextConditioner, state_dict: dict[str, Any], prefix: str, local_metadata
) -> None:
    """state_dict post-hook: leave the frozen encoder out unless `save_encoder`."""
    if not module.save_encoder:
        for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
            del state_dict[key]


def _keep_encoder_weights(module: TextConditioner, state_dict: dict[str, Any], prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state dict without encoder weights keeps the loaded ones."""
    for key, value in module.encoder.state_dict().items():
        state_dict.setdefault(prefix + "encoder." + key, value)
