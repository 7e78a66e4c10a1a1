#!/usr/bin/env bash
# One node, one worker per visible GPU (or NPROC CPU processes):
#   bash launch/torchrun.sh --model_type vit_h --checkpoint sam_vit_h_4b8939.pth --train_dir data/train
# Every argument goes to run.py. NPROC overrides the process count. MAX_RESTARTS: how often
# torchrun restarts the workers after one fails (default 0); give run.py --output_dir DIR
# --resume auto with it, so that the restarted workers continue DIR/last.pth.
# torchrun through segment_anything.tools.torchrun: the same flags, no traceback on Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/python.sh"
# A store of its own for each attempt: a group that torchrun restarts must not find the failed
# attempt's addresses in torchrun's shared one (run.py refuses --max_restarts without this).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec "$PY" -m segment_anything.tools.torchrun --standalone --nproc_per_node "$NPROC" \
  --max_restarts "${MAX_RESTARTS:-0}" run.py "$@"
