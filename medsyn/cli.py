"""The `medsyn` console script: one sub-command per module in `medsyn.commands`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Errors a user can fix (`MedsynError`) are printed as one line, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medsyn.errors import MedsynError

# command name -> module under medsyn.commands
COMMANDS: dict[str, str] = {
    "summary": "summary",
    "phantom": "phantom",
    "prepare": "prepare",
    "drr": "drr",
    "evaluate": "evaluate",
    "evaluate-cxr": "evaluate_cxr",
    "controllability": "controllability",
    "vocab": "vocab",
    "prompts": "prompts",
    "codebook": "codebook",
    "keypatches": "keypatches",
    "align-map": "align_map",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsyn", description="Text-guided, anatomy-aware synthesis of 3D chest CT."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"medsyn.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def run_cli(func, prog: str, *args) -> int:
    """Call `func(*args)`, turning user errors into a one-line message and exit code 2."""
    try:
        return int(func(*args) or 0)
    except MedsynError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(args._run, f"medsyn {args.command}", args)


if __name__ == "__main__":
    sys.exit(main())
