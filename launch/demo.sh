#!/usr/bin/env bash
# The README's main job: set up, make a synthetic dataset, fine-tune vit_t's mask decoder on
# 2 CPU processes (gloo) for a minute or two. No downloads besides the Python packages.
# VENV names the virtual environment to create or reuse (default .venv); extra flags go to run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
"$VENV/bin/python" -m segment_anything.tools.synthetic_data demo_data --n 48
exec "$VENV/bin/python" run.py --train_dir demo_data --model_type vit_t --checkpoint none --image_size 256 \
  --world_size 2 --batch_size 4 --epoch 10 --lr 1e-3 "$@"
