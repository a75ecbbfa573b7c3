"""Text conditioning: a frozen BERT-family encoder turning reports into cross-attention context."""

from medsyn.text.cache import FeatureCache, text_key
from medsyn.text.encoder import DEFAULT_TEXT_MODEL, NULL_KINDS, TextConditioner, hub_offline, load_text_model
from medsyn.text.tiny import build_tiny_bert, train_tokenizer

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "NULL_KINDS",
    "FeatureCache",
    "TextConditioner",
    "build_tiny_bert",
    "hub_offline",
    "load_text_model",
    "text_key",
    "train_tokenizer",
]
