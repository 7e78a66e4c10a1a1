#!/usr/bin/env bash
# Every CUDA path, on one GPU, in a few minutes: the CUDA tests (tests/test_cuda.py), short runs of
# run.py through each path, then a performance table (bench/_gpu_table.py). From the repository:
#   bash bench/gpu_check.sh            # TABLE_MODELS=vit_b (default vit_b,vit_h) for a shorter table
# Runs of vit_t on synthetic data with random weights, each under its own time limit; a failure is
# reported with its log's last lines and the next check runs. Ends with one table: check, result,
# seconds; the exit status is the number of failed checks. Without CUDA: one line, exit 0.
set -uo pipefail
source "$(dirname "$0")/../launch/python.sh"  # cd to the repository, PY = its Python
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -n 1)); nothing checked"
  exit 0
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
SUMMARY=()
FAILED=0
T0=$(date +%s)

# check NAME LIMIT_S COMMAND...: run, keep the log, record PASS/FAIL and the seconds.
check() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name" >&2
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a program
    timeout --kill-after 10 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" >"$WORK/log" 2>&1
  else
    timeout --kill-after 10 "$limit" "$@" >"$WORK/log" 2>&1
  fi
  rc=$?
  if [ "$rc" = 0 ]; then
    SUMMARY+=("| $name | PASS | $(($(date +%s) - start)) |")
  else
    FAILED=$((FAILED + 1))
    [ "$rc" = 124 ] && rc="timeout after ${limit} s"
    SUMMARY+=("| $name | FAIL ($rc) | $(($(date +%s) - start)) |")
    echo "-- $name failed ($rc); last lines:" >&2
    tail -n 25 "$WORK/log" >&2
  fi
}

# A run.py run that must end with a trained epoch and finite losses; extra python checks on last.pth.
run_py() {  # OUT, then run.py's flags
  local out=$1
  shift
  "$@" --output_dir "$out" || return 1
  "$PY" - "$out" <<'EOF'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
trained = [r for r in records if r["epoch"] > 0]
assert trained and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in trained), records
log = (out / "train.log").read_text()
assert "torch.compile failed" not in log, "torch.compile fell back to eager"
print("ok:", trained[-1])
EOF
}

"$PY" - "$WORK" <<'EOF' || { echo "gpu_check: could not make the synthetic data"; exit 1; }
import sys
from pathlib import Path
from segment_anything.utils.data import make_synthetic_dataset
root = Path(sys.argv[1])
make_synthetic_dataset(root / "train", n=8, size_range=(200, 320), seed=1)
make_synthetic_dataset(root / "val", n=2, size_range=(200, 320), seed=2)
kw = dict(size_range=(200, 320), layout="image", kind="instance_map", objects=2)
make_synthetic_dataset(root / "sem_train", n=8, seed=3, **kw)
make_synthetic_dataset(root / "sem_val", n=2, seed=4, **kw)
make_synthetic_dataset(root / "table", n=16, size_range=(600, 1000), seed=5, objects=2)
EOF
COMMON=(--model_type vit_t --checkpoint none --image_size 256 --train_dir "$WORK/train" --val_dir "$WORK/val"
        --batch_size 2 --epoch 2 --device cuda --cache_dir "$WORK/cache")
SEMANTIC=(--model_type vit_t --checkpoint none --image_size 256 --train_dir "$WORK/sem_train" --val_dir "$WORK/sem_val"
          --task semantic --data_format instance_map --batch_size 2 --epoch 2 --device cuda --no_cache True)

check "CUDA tests (tests/test_cuda.py)" 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

check "NCCL, world size 1: helpers and a DDP step" 120 "$PY" - <<'EOF'
import os, socket
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from segment_anything import sam_model_registry
from segment_anything.utils import distributed as d
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=torch.device("cuda", 0))
assert dist.get_backend() == "nccl"
assert d.all_reduce_sum(torch.ones(3, device="cuda")).tolist() == [1.0, 1.0, 1.0]
assert d.broadcast_object({"a": 1}) == {"a": 1} and d.all_gather_objects("x") == ["x"]
sam = sam_model_registry["vit_t"](checkpoint=None, image_size=256).cuda()
d.share_buffers(sam.image_encoder)
model = DDP(sam.mask_decoder, device_ids=[0])
emb = torch.randn(1, 256, 16, 16, device="cuda")
sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 10.0, 100.0, 100.0]], device="cuda"), masks=None)
masks, iou = model(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
(masks.float().mean() + iou.float().mean()).backward()
d.barrier()
assert all(p.grad is not None for p in sam.mask_decoder.parameters() if p.requires_grad)
dist.destroy_process_group()
print("nccl ok")
EOF

check "torchrun, 1 worker: AMP fp16 + grad scaler, pinned memory + 2 loader workers" 240 \
  run_py "$WORK/fp16" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 run.py "${COMMON[@]}" \
  --amp fp16 --num_workers 2
"$PY" -c "
import sys, torch
s = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
assert s['scaler'].get('scale', 0) > 0, 'fp16 run without a grad scaler state'
" "$WORK/fp16/last.pth" >"$WORK/log" 2>&1 || { FAILED=$((FAILED + 1)); SUMMARY+=("| fp16 run: grad scaler state in last.pth | FAIL | 0 |"); }

check "run.py, 1 process: AMP bf16" 180 run_py "$WORK/bf16" "$PY" run.py "${COMMON[@]}" --amp bf16 --dist False --num_workers 0

check "run.py --compile (decoder step compiled on CUDA)" 300 run_py "$WORK/compile" "$PY" run.py "${COMMON[@]}" \
  --compile True --amp off --dist False --num_workers 2

check "run.py, 2 processes on one GPU (gloo), prompt mode, bf16" 240 run_py "$WORK/two" "$PY" run.py "${COMMON[@]}" \
  --amp bf16 --world_size 2 --num_workers 1

check "run.py --task semantic, 2 processes on one GPU (gloo): SyncBatchNorm" 240 run_py "$WORK/semantic" "$PY" run.py \
  "${SEMANTIC[@]}" --world_size 2 --num_workers 1

check "performance table" 300 "$PY" bench/_gpu_table.py --data "$WORK/table" --models "${TABLE_MODELS:-vit_b,vit_h}"
TABLE=$(grep -v '^#' "$WORK/log")

echo
echo "command: bash bench/gpu_check.sh $*"
"$PY" -c "import torch; from bench._machine import machine_line; print(machine_line(torch.get_num_threads()))" 2>/dev/null
echo
echo "| check | result | seconds |"
echo "|---|---|---:|"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "$TABLE"
echo
echo "gpu_check: $FAILED failed check(s), $(($(date +%s) - T0)) s in all"
exit "$FAILED"
