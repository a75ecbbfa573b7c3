"""Train a medsyn model: `python train.py base|sr|text --config CONFIG.yaml [dotted.key=value ...]`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the medsyn base (text-to-64^3) or SR (256^3) model, or fine-tune the text encoder."
    )
    parser.add_argument("stage", choices=["base", "sr", "text"], help="which model to train")
    parser.add_argument("--config", help="run config YAML (defaults of the stage when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=20")
    args = parser.parse_intermixed_args(argv)

    from medsyn.cli import run_cli

    def run() -> int:
        from medsyn.training.config import load_run_config

        cfg = load_run_config(args.stage, args.config, args.overrides)
        if args.stage == "text":
            from medsyn.training.text import train_text

            run_dir = train_text(cfg)
            print(
                f"medsyn: run directory {run_dir} (config.yaml, checkpoints/last.ckpt, text_encoder/, metrics.json)"
            )
            return 0
        from medsyn.training.run import train

        run_dir = train(cfg)
        print(f"medsyn: run directory {run_dir} (config.yaml, checkpoints/last.ckpt, model.safetensors)")
        return 0

    return run_cli(run, f"train.py {args.stage}")


if __name__ == "__main__":
    sys.exit(main())
