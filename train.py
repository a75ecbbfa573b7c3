"""Train a medsyn model: `python train.py base|sr|text|align --config CONFIG.yaml [dotted.key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import sys

# stage -> (module, its training function, what the run directory gets beside config.yaml and checkpoints/)
STAGES = {
    "base": ("medsyn.training.run", "train", "model.safetensors"),
    "sr": ("medsyn.training.run", "train", "model.safetensors"),
    "text": ("medsyn.training.text", "train_text", "text_encoder/, metrics.json"),
    "align": ("medsyn.training.align", "train_align", "model.safetensors, metrics.json"),
    "cxr": ("medsyn.training.cxr", "train_cxr", "model.safetensors, tokenizer/, metrics.json"),
    "cxr-diffusion": ("medsyn.training.cxr_diffusion", "train_cxr_diffusion", "model.safetensors"),
    "vqgan": ("medsyn.training.vqgan", "train_vqgan", "model.safetensors, metrics.json, reconstructions.png"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the medsyn base (text-to-64^3) or SR (256^3) model, fine-tune the text encoder, "
        "or train the report-volume alignment (a word-patch dual encoder)."
    )
    parser.add_argument("stage", choices=list(STAGES), help="which model to train")
    parser.add_argument("--config", help="run config YAML (defaults of the stage when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=20")
    args = parser.parse_intermixed_args(argv)

    from medsyn.cli import run_cli

    def run() -> int:
        from medsyn.training.config import load_run_config

        cfg = load_run_config(args.stage, args.config, args.overrides)
        module, function, outputs = STAGES[args.stage]
        run_dir = getattr(importlib.import_module(module), function)(cfg)
        print(f"medsyn: run directory {run_dir} (config.yaml, checkpoints/last.ckpt, {outputs})")
        return 0

    return run_cli(run, f"train.py {args.stage}")


if __name__ == "__main__":
    sys.exit(main())
