#!/usr/bin/env bash
# One node, every visible GPU: bash launch/torchrun.sh --model_type vit_h --checkpoint sam_vit_h_4b8939.pth --train_dir data/train
# Extra flags go to run.py. NPROC overrides the process count.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node "$NPROC" run.py --batch_size 8 --dist True "$@"
