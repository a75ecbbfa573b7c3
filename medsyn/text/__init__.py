"""Text conditioning: a frozen BERT-family encoder turning reports into cross-attention context."""

from medsyn.text.cache import FeatureCache, text_key
from medsyn.text.tiny import build_tiny_bert, train_tokenizer

__all__ = ["FeatureCache", "build_tiny_bert", "text_key", "train_tokenizer"]
