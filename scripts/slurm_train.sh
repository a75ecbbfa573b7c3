#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU; Lightning reads the SLURM environment
# (SLURM_NTASKS, SLURM_PROCID, ...) and sets up DDP over NCCL.
#
#   sbatch scripts/slurm_train.sh base configs/base.yaml        # 2 nodes x 4 GPUs
#
#SBATCH --job-name=medsyn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@120
set -euo pipefail
STAGE=${1:-base}
CONFIG=${2:-configs/${STAGE}.yaml}
shift 2 || true
# resume=auto: a requeued job continues from run_dir/checkpoints/last.ckpt
srun python train.py "$STAGE" --config "$CONFIG" \
    trainer.devices="$SLURM_NTASKS_PER_NODE" trainer.num_nodes="$SLURM_NNODES" trainer.strategy=ddp "$@"
