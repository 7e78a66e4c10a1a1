"""A 2-process tiled training run on the 6000x4000 nuclei mosaic, killed mid-epoch and resumed, ends
with the weights of the same run left alone (a check at full size; tests/training/test_tiled_training.py
does the same on tiny images in every test run).

Both runs: run.py with --tile 1024 --tile_overlap 128 on the mosaic of bench/tiles.py, 2 gloo
processes on the CPU, vit_t with random weights at --image_size 256 (the mechanism, not the
quality: a small encoder input keeps the check short), the embedding cache on, one epoch, last.pth
every step. The second run is killed (SIGKILL, launcher and workers) once last.pth holds a step
inside the epoch, then continued with --resume alone.

    python bench/tiles_resume.py
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._machine import machine_line  # noqa: E402
from bench.tiles import build_mosaic  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def flags(train: Path, val: Path, out: Path, cache: Path) -> list:
    values = {"checkpoint": "none", "model_type": "vit_t", "image_size": 256, "world_size": 2, "batch_size": 1,
              "num_workers": 0, "epoch": 1, "seed": 5, "save_every": 1, "eval_base": "no", "data_format": "instance_map",
              "tile": 1024, "tile_overlap": 128, "max_objects": 4, "train_dir": train, "val_dir": val,
              "output_dir": out, "cache_dir": cache}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def state(out: Path) -> dict:
    return torch.load(out / "last.pth", map_location="cpu", weights_only=True)


def run(args: list) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: run.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def killed(args: list, out: Path) -> dict:
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                sys.exit("error: the run ended before it could be killed")
            if (out / "last.pth").exists():
                s = state(out)
                if s["epoch"] == 0 and s["step"] >= 2:
                    break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return state(out)


def main() -> None:
    work = Path(tempfile.gettempdir()) / "sam_bench_tiles"
    train = build_mosaic(work / "6000x4000", 4000, 6000)
    val = build_mosaic(work / "3000x2000", 2000, 3000)
    runs = Path(tempfile.mkdtemp(prefix="tiles_resume."))
    cache = runs / "cache"
    seconds = run(flags(train, val, runs / "straight", cache))
    seen = killed(flags(train, val, runs / "killed", cache), runs / "killed")
    run(["--resume", str(runs / "killed")])
    a, b = state(runs / "killed")["model"], state(runs / "straight")["model"]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
    log = (runs / "straight" / "train.log").read_text().splitlines()
    print("command: python bench/tiles_resume.py")
    print(machine_line(1))
    for line in log:
        if "tiles of" in line or "train: " in line and "tiles" in line or "validation: " in line and "tiles" in line:
            print(line.split("INFO ", 1)[-1])
    print(f"straight run: {seconds:.0f} s, {state(runs / 'straight')['steps_per_epoch']} steps per epoch; killed at "
          f"epoch {seen['epoch'] + 1}, step {seen['step']}; resumed to the end")
    print(f"largest difference between the two runs' final weights: {diff:.3g}")
    print(f"runs in {runs}")


if __name__ == "__main__":
    main()
