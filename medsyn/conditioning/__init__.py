"""Conditioners: what a model is generated from, turned into the network's keyword arguments.

Every conditioner is an `nn.Module` with one interface, used by training and generation alike:

    key                                   the batch entry it reads ("text": report strings,
                                          "lowres": the upsampled low-resolution volume)
    forward(inputs, *, train, generator)  -> dict of network keyword arguments (train: with the
                                          randomness of training, e.g. condition dropout)
    unconditional(cond)                   -> the null condition shaped like `cond` for classifier-free
                                          guidance, or None when the conditioner has none
    unet_arguments()                      -> UNet constructor arguments it fixes (feature widths)

A conditioner with `joins = KEY` appends its tokens to those of conditioner KEY: `forward` also takes
`joined` (that one's output) and `joined_null` (its null condition) and returns the tokens of both.

`medsyn.generation.model.CONDITIONERS` maps a run config's section name to its class: a run conditions on
each section it has (the base stage has `text`, and `keypatches` from `medsyn.alignment`, the SR stage
`lowres`), so a new kind of model is a new entry there.
"""

from medsyn.conditioning.features import FeatureCache, text_key
from medsyn.conditioning.lowres import LowResConditioner
from medsyn.conditioning.text import (
    DEFAULT_TEXT_MODEL,
    NULL_KINDS,
    TextConditioner,
    hub_offline,
    load_text_model,
)
from medsyn.conditioning.tiny_bert import build_tiny_bert, train_tokenizer

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "NULL_KINDS",
    "FeatureCache",
    "LowResConditioner",
    "TextConditioner",
    "build_tiny_bert",
    "hub_offline",
    "load_text_model",
    "text_key",
    "train_tokenizer",
]
