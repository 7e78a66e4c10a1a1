#!/usr/bin/env bash
# Several nodes: run this on every node with the same NNODES and RDZV_ENDPOINT (host:port of the
# first node, which hosts the rendezvous) and each node's NODE_RANK (0 on the first node):
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node1:29500 bash launch/multinode.sh --train_dir data/train ...
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node1:29500 bash launch/multinode.sh --train_dir data/train ...
# Every argument goes to run.py. NPROC: workers per node (default: visible GPUs, else 1);
# RDZV_ID: a name shared by the nodes of one run; under SLURM, NODE_RANK defaults to SLURM_NODEID.
# MAX_RESTARTS: how often torchrun restarts the whole group after a worker fails (default 0); give
# run.py --output_dir DIR --resume auto with it, so that the restarted workers continue DIR/last.pth.
# torchrun through segment_anything.tools.torchrun: the same flags, no traceback on Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/python.sh"
# A store of its own for each attempt: a group that torchrun restarts must not find the failed
# attempt's addresses in torchrun's shared one (run.py refuses --max_restarts without this).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
: "${NNODES:?set NNODES (number of nodes)}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port on the first node)}"
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
# The first node hosts the rendezvous store; the others connect to it (explicit, so that two
# "nodes" on one machine do not both try to host it).
IS_HOST=${IS_HOST:-$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)}
exec "$PY" -m segment_anything.tools.torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --max_restarts "${MAX_RESTARTS:-0}" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-sam-finetune}" \
  --rdzv_conf "is_host=$IS_HOST" run.py "$@"
