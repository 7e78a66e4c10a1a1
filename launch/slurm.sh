#!/usr/bin/env bash
# Multi-node on SLURM: sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh --model_type vit_h --checkpoint ... --train_dir ...
#SBATCH --job-name=sam-finetune
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%j.out
# One torchrun per node; torchrun starts one worker per GPU and sets RANK/LOCAL_RANK/WORLD_SIZE (env://).
set -euo pipefail
GPUS=${SLURM_GPUS_ON_NODE:-$(python -c "import torch; print(torch.cuda.device_count())")}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:29500" \
  run.py --batch_size 8 --dist True "$@"
