#!/usr/bin/env bash
# The whole pipeline on the built-in phantom data, on a CPU: install, a text encoder fine-tuned on
# phantom reports, phantoms + cache (made by the base training command), base model (32^3), SR model
# (32^3 -> 128^3), then samples with masks and previews in outputs/demo/. Re-running continues
# finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e .
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
python train.py text --config configs/demo/text.yaml
python train.py base --config configs/demo/base.yaml
python train.py sr --config configs/demo/sr.yaml
python sample.py --base runs/demo/base --sr runs/demo/sr --out outputs/demo --overwrite --seed 0 \
    --prompt "FINDINGS: The lungs are clear. No pleural effusion. Heart size is normal. IMPRESSION: Normal chest CT." \
    --prompt "FINDINGS: Large right pleural effusion with adjacent compressive atelectasis. The heart is enlarged. IMPRESSION: Large right pleural effusion. Cardiomegaly."
echo "medsyn demo: samples in outputs/demo/<index>/ (ct.nii.gz, lobes/airway/vessels.nii.gz, preview.png, meta.json)"
