#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (CPU): torch's CPU build first, then medsyn with
# its dev extra, then pytest (slow checks are behind `-m slow`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
exec python -m pytest -q "$@"
