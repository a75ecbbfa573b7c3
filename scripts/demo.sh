#!/usr/bin/env bash
# The whole pipeline on the built-in phantom data, on a CPU: install, a text encoder trained on
# phantom reports, phantoms + cache (made by the base training command), base model (16^3), SR model
# (16^3 -> 128^3), then a normal and an effusion prompt sampled with the same seed, with masks and
# previews in outputs/demo/. Re-running continues finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e .
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
python train.py text --config configs/demo/text.yaml
python train.py base --config configs/demo/base.yaml
python train.py sr --config configs/demo/sr.yaml
# the same seed for both prompts: the same body, the difference is the report's
python sample.py --base runs/demo/base --sr runs/demo/sr --out outputs/demo --overwrite --precision bf16 \
    --prompts-file configs/demo/prompts.jsonl
echo "medsyn demo: samples in outputs/demo/<index>/ (ct.nii.gz, lobes/airway/vessels.nii.gz, preview.png, meta.json)"
