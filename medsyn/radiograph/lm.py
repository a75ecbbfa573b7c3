"""The causal language model over report and VQ-GAN tokens: build it, its tokenizer, and reload a trained
`train.py cxr` run for sampling.

Any transformers causal LM serves: a local directory or hub name (`model.name`; safetensors weights only,
never remote code), or one built from scratch from `model.config` (`{model_type: gpt2, n_layer, n_head,
n_embd, n_positions}`). Its embeddings grow to the extended vocabulary (`medsyn.radiograph.sequence`).
The tokenizer is `model.tokenizer` (a directory or hub name), else `model.name`'s, else a WordPiece
tokenizer trained on the training reports (`medsyn.conditioning.tiny_bert.train_tokenizer`, offline).

A run directory holds `model.safetensors` (the LM's weights; its metadata the run config, the LM's own
transformers config `lm_config` and the token `layout`) and `tokenizer/`; `load_lm_run` needs nothing else.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsyn.errors import ConfigError, DataError
from medsyn.io import atomic_dir, usual_mode
from medsyn.radiograph.sequence import TokenLayout, Vocabulary
from medsyn.weights import WEIGHTS_FILE, load_weights, sha256_file

TOKENIZER_DIR = "tokenizer"
STAGE = "cxr"


def load_tokenizer(model_cfg: Mapping[str, Any], texts: Sequence[str] = (), vocab_size: int = 2000) -> Any:
    """The LM's text tokenizer: `model_cfg["tokenizer"]`, else `model_cfg["name"]`'s, else a WordPiece
    tokenizer of `vocab_size` trained on `texts` (the training reports; the same texts give the same one)."""
    from transformers import AutoTokenizer

    source = model_cfg.get("tokenizer") or model_cfg.get("name")
    if source:
        key = "model.tokenizer" if model_cfg.get("tokenizer") else "model.name"
        try:
            return AutoTokenizer.from_pretrained(str(source), revision=model_cfg.get("revision"),
                                                 trust_remote_code=False)  # fmt: skip
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{key}={source}: cannot load a tokenizer from it ({err})") from err
    from medsyn.conditioning.tiny_bert import train_tokenizer

    try:
        return train_tokenizer(texts, vocab_size=int(vocab_size), model_max_length=1 << 20)
    except ValueError as err:
        raise ConfigError(f"model.tokenizer_vocab_size={vocab_size}: {err}") from err


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write the tokenizer's files (save_pretrained) to `directory`, replacing it whole."""
    with atomic_dir(directory, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            usual_mode(path)
    return Path(directory)


def scratch_config(spec: Mapping[str, Any], vocab: Vocabulary | None = None) -> Any:
    """A transformers config from `{model_type, ...its arguments}`; keys the model type does not know are a
    ConfigError (transformers would keep a typo silently). With `vocab`: its size and special ids set."""
    from transformers import AutoConfig

    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model.config={spec}: expected a model_type (e.g. gpt2) and its arguments")
    try:
        default = AutoConfig.for_model(str(model_type))
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"model.config.model_type={model_type!r}: not a transformers model type ({err})"
        ) from err
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"model.config: unknown key(s) {unknown} for model_type {model_type}")
    if vocab is not None:
        spec.update(vocab_size=vocab.size, bos_token_id=vocab.bos_id, eos_token_id=vocab.image_end,
                    pad_token_id=vocab.pad)  # fmt: skip
    try:
        return AutoConfig.for_model(str(model_type), **spec)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.config: {err}") from err


def build_lm(model_cfg: Mapping[str, Any], vocab: Vocabulary, seed: int = 0) -> Any:
    """The causal LM of the `model` section with `vocab.size` embeddings: `name` loaded (safetensors only)
    and resized, or a new one from `config` initialised from `seed` (the global RNG is left as it was)."""
    from transformers import AutoModelForCausalLM

    name = model_cfg.get("name")
    if name:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(
                    str(name), revision=model_cfg.get("revision"), trust_remote_code=False,
                    use_safetensors=True, dtype=torch.float32,
                )  # fmt: skip
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                f"model.name={name}: cannot load it as a causal LM from safetensors ({err})"
            ) from err
        text_rows = model.get_input_embeddings().weight.shape[0]
        if text_rows < vocab.text_size:
            raise ConfigError(
                f"model.name={name}: {text_rows} embeddings for a tokenizer of {vocab.text_size}"
            )
        model.resize_token_embeddings(vocab.size, mean_resizing=True)
        model.config.update({"bos_token_id": vocab.bos_id, "eos_token_id": vocab.image_end,
                             "pad_token_id": vocab.pad})  # fmt: skip
        return model
    config = scratch_config(model_cfg.get("config") or {}, vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return AutoModelForCausalLM.from_config(config)


def lm_positions(model: Any) -> int | None:
    """How many positions the LM has (None: not limited by its config, e.g. rotary embeddings)."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def lm_config(model: Any) -> dict[str, Any]:
    """The LM's transformers config as a plain dict (stored in the exported weights)."""
    return model.config.to_dict()


def rebuild_lm(config: Mapping[str, Any]) -> Any:
    """An LM of the architecture `config` (`lm_config`'s dict) with fresh weights, to load a state into."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    model_type = spec.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec))


@dataclass
class LMRun:
    """A trained `train.py cxr` language model, ready to sample (eval mode, no gradients)."""

    run_dir: Path
    config: dict
    model: Any
    tokenizer: Any
    layout: TokenLayout
    weights: Path
    sha256: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_lm_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> LMRun:
    """The LM of a `train.py cxr` run directory (model.safetensors + tokenizer/), on `device`."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such weights file; train the run with `python train.py cxr` first")
    state, config = load_weights(path)
    if config.get("stage") != STAGE or "lm_config" not in config or "layout" not in config:
        raise DataError(f"{path}: weights of a {config.get('stage')!r} run, not of `train.py cxr`")
    try:
        layout = TokenLayout.from_dict(config["layout"])
        with torch.random.fork_rng(devices=[]):
            model = rebuild_lm(config["lm_config"])
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: the weights do not fit the model its config describes ({first})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER_DIR), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{run_dir / TOKENIZER_DIR}: cannot load the run's tokenizer ({err})") from err
    if len(tokenizer) != layout.vocab.text_size:
        raise DataError(f"{run_dir / TOKENIZER_DIR}: {len(tokenizer)} tokens, but the weights were trained "
                        f"with {layout.vocab.text_size}; the folder is not this run's tokenizer")  # fmt: skip
    model.eval().requires_grad_(False).to(device)
    return LMRun(run_dir, config, model, tokenizer, layout, path, sha256_file(path))
