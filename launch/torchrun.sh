#!/usr/bin/env bash
# One node, one worker per visible GPU (or NPROC CPU processes):
#   bash launch/torchrun.sh --model_type vit_h --checkpoint sam_vit_h_4b8939.pth --train_dir data/train
# Every argument goes to run.py. NPROC overrides the process count.
# torchrun through segment_anything.tools.torchrun: the same flags, no traceback on Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/python.sh"
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec "$PY" -m segment_anything.tools.torchrun --standalone --nproc_per_node "$NPROC" run.py "$@"
