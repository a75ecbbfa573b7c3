"""A tiny BERT and WordPiece tokenizer built offline, saved as a standard Hugging Face model directory.

Tests and the CPU demo need a text encoder without the model hub: this writes a randomly initialised
`BertModel` (config.json + model.safetensors) and a fast BERT tokenizer (tokenizer.json, vocab.txt)
trained on the given reports, so `TextConditioner(out_dir)` loads it exactly like a downloaded model.
The layout is the one `train.py text` (MLM + paired-section fine-tuning) reads and writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medsyn.io import atomic_dir, usual_mode

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's own order


def _check_texts(texts: Iterable[str]) -> list[str]:
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("training a tokenizer needs at least one non-empty report text")
    return texts


def wordpiece_vocabulary(texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> list[str]:
    """A WordPiece vocabulary that is the same on every machine and in every process.

    (The `tokenizers` WordPiece trainer breaks ties between equally frequent merges in hash-map order,
    which differs per process, so two runs on one corpus disagree.) Here: the special tokens, every
    character seen (alone and as a `##` continuation), then whole words by frequency (ties by spelling),
    then the most frequent word endings as `##` pieces, up to `vocab_size`. Words outside the vocabulary
    fall back to its pieces by WordPiece's greedy longest match.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in _check_texts(texts):
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(vocab)} special tokens and characters of the corpus"
        )
    ranked = sorted(
        ((n, w) for w, n in words.items() if n >= min_frequency and len(w) > 1), key=lambda t: (-t[0], t[1])
    )
    vocab += [w for _, w in ranked[: vocab_size - len(vocab)]]
    if len(vocab) < vocab_size:  # room left: the endings of the words that did not fit
        taken = set(vocab)
        endings: Counter[str] = Counter()
        for w, n in words.items():
            if w not in taken:
                for k in range(1, len(w) - 1):
                    endings[f"##{w[k:]}"] += n
        pieces = sorted(((n, p) for p, n in endings.items() if n >= min_frequency and p not in taken),
                        key=lambda t: (-t[0], t[1]))  # fmt: skip
        vocab += [p for _, p in pieces[: vocab_size - len(vocab)]]
    return vocab


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    min_frequency: int = 1,
    model_max_length: int = 512,
) -> PreTrainedTokenizerBase:
    """A lowercasing WordPiece BERT tokenizer for report texts (see `wordpiece_vocabulary`); saved to
    `out_dir` if given. Ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]. Returns a `BertTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    vocab = wordpiece_vocabulary(texts, vocab_size, min_frequency)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok, do_lower_case=True, model_max_length=model_max_length,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """Save with `save_pretrained` plus a `vocab.txt` (one token a line, by id) for slow BERT loaders."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (out_dir / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")


def tiny_bert_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
):
    """A `BertConfig` for a small encoder (validated: the width must split into the heads)."""
    from transformers import BertConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
    )


def build_tiny_bert(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 1000,
    max_position_embeddings: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised tiny `BertModel` + a tokenizer trained on `texts` to `out_dir`.

    Same seed, texts and sizes give the same weights; the global RNG is left untouched. The directory
    appears atomically (a crash leaves nothing half-written). Returns `out_dir`.
    """
    from transformers import BertModel

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    config = tiny_bert_config(
        len(tokenizer), hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: BertModel = BertModel(config)
    model.eval()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        for path in tmp.iterdir():  # safetensors writes model.safetensors with mode 0600
            if path.is_file():
                usual_mode(path)
    return out_dir
