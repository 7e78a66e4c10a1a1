#!/usr/bin/env bash
# Multi-node on SLURM, from the repository root:
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh --model_type vit_h --checkpoint sam_vit_h_4b8939.pth --train_dir data/train
# One task per node; each runs torchrun (launch/multinode.sh), which starts one worker per GPU.
# The rendezvous is on the first node of the allocation. The run folder is runs/slurm-<job id>
# (RUN_DIR overrides it), which a requeued job keeps: --resume auto starts the run when the folder
# holds no last.pth and continues it from its last.pth when it does.
# Pre-emption and the time limit: SLURM sends SIGTERM (the workers save last.pth and stop), and
# the job is requeued (--requeue; USR1 shortly before the time limit requeues it too).
# A worker that fails (a crash, the OOM killer): with MAX_RESTARTS=K in sbatch's environment
# (MAX_RESTARTS=3 sbatch ...), torchrun restarts the workers up to K times and they continue the
# run folder's last.pth; without it the job ends.
# Every argument goes to run.py.
#SBATCH --job-name=sam-finetune
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail
REPO=${SLURM_SUBMIT_DIR:-$(pwd)}  # sbatch runs a copy of this script: its own folder is not the repository
source "$REPO/launch/python.sh"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export NNODES=$SLURM_NNODES RDZV_ENDPOINT="$HEAD:${RDZV_PORT:-29500}" RDZV_ID=$SLURM_JOB_ID
export NPROC=${SLURM_GPUS_ON_NODE:-${NPROC:-1}}
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
# Each task (one per node) gets its NODE_RANK from SLURM_NODEID inside multinode.sh.
RUN_DIR=${RUN_DIR:-runs/slurm-$SLURM_JOB_ID}
srun --kill-on-bad-exit=1 bash launch/multinode.sh --output_dir "$RUN_DIR" --resume auto "$@" &
SRUN=$!
while true; do  # a trapped USR1 interrupts wait; keep waiting for srun itself
  wait "$SRUN" && exit 0 || rc=$?
  kill -0 "$SRUN" 2>/dev/null || exit "$rc"
done
