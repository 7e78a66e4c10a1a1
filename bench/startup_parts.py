"""Where a first start's time goes: its phases, and the check's cost per sample against decoding.

    python bench/startup_parts.py --root DIR                     # the 100,000-image set
    python bench/startup_parts.py --root DIR --size 4000 --side 1024 --samples 200

The sets are bench/startup.py's (made there, or here on first use, in the same folder).

Phases: one first start of run.py (vit_t, random weights, 64 px, a fresh manifest folder, ended
after its first training step as bench/startup.py ends it) in a process of its own whose phase
functions are wrapped by timers: importing the package (and torch), listing the files, checking
every sample (the forked checking processes; the manifest records are stored as results come),
writing the manifest, the seeded split with the duplicate-content comparison, and the worker
(the model, the loaders and the first step).

Per sample: the first 2,000 samples (--samples) checked in this process as a checking process checks them
(OpenCV on one thread), part by part, against cv2.imread of the image and the mask file.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._machine import machine_line  # noqa: E402
from bench.startup import SIDE, make_set, warm_page_cache  # noqa: E402

# Runs run.py's main in this process with timers around its phases; prints one JSON line of
# {phase: seconds} when the first step ends (the test hook's os._exit).
DRIVER = r"""
import json, os, sys, time
t0 = time.perf_counter()
marks = {}
sys.argv = ["run.py"] + sys.argv[1:]
import segment_anything.tools.train as train
marks["import"] = time.perf_counter() - t0
from segment_anything.utils.data import prepare, manifest
from segment_anything.training import launch

running = {}  # phases entered and not left: the worker is left by os._exit at its first step

def timed(owner, name, key):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        running[key] = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            marks[key] = marks.get(key, 0.0) + time.perf_counter() - running.pop(key)
    setattr(owner, name, wrapper)

for owner, name, key in ((prepare, "scan", "listing"), (prepare, "run_checks", "check"),
                         (manifest.Manifest, "save", "manifest"), (prepare, "split_records", "split"),
                         (prepare, "_overlap", "split"), (launch, "worker", "worker")):
    timed(owner, name, key)
main_pid, exit_now = os.getpid(), os._exit
def report(code):
    if os.getpid() == main_pid:
        now = time.perf_counter()
        for key, start in running.items():
            marks[key] = marks.get(key, 0.0) + now - start
        marks["total"] = now - t0
        print("PHASES " + json.dumps(marks), flush=True)
    exit_now(code)
os._exit = report
train.main()
"""

PHASES = (("import", "importing the package and torch"), ("listing", "listing the files"),
          ("check", "checking every sample (forked processes)"), ("manifest", "writing the manifest"),
          ("split", "seeded split, duplicate-content comparison"), ("worker", "model, loaders, first step"))


def phases(folder: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_parts.") as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=str(Path(tmp) / "xdg"), SAM_TEST_FAULT="exit:0:0",
                   PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-c", DRIVER, "--train_dir", str(folder), "--model_type", "vit_t", "--checkpoint", "none",
               "--image_size", "64", "--epoch", "1", "--batch_size", "2", "--num_workers", "0", "--dist", "False",
               "--no_cache", "True", "--eval_base", "False", "--output_dir", str(Path(tmp) / "run")]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PHASES ")]
    if not lines:
        sys.exit(f"run.py did not reach its first step:\n{out.stderr[-3000:]}")
    marks = json.loads(lines[-1][len("PHASES "):])
    marks["check"] -= marks.get("manifest", 0.0)  # run_checks writes the manifest at its end
    return marks


def per_sample(folder: Path, n: int = 2000, rounds: int = 3) -> dict:
    """{part: ms per sample}, the best of `rounds` passes over the first n samples."""
    from segment_anything.utils.data import image_io
    from segment_anything.utils.data.formats import DataOptions, folder as folder_format

    opts = DataOptions()
    pairs = folder_format.find_pairs(folder)[0][:n]
    cv2.setNumThreads(1)  # as in the checking processes
    best: dict = {}
    for _ in range(rounds):
        spent = dict.fromkeys(("decode", "check", "image", "mask", "components", "areas", "digest"), 0.0)
        for pair in pairs:
            t0 = time.perf_counter()
            cv2.imread(str(pair.image_file), cv2.IMREAD_UNCHANGED)
            cv2.imread(str(pair.mask_file), cv2.IMREAD_UNCHANGED)
            t1 = time.perf_counter()
            folder_format.build(pair, opts)
            t2 = time.perf_counter()
            image = image_io.load_image(pair.image_file, opts.image_spec)
            t3 = time.perf_counter()
            mask = image_io.load_mask(pair.mask_file)
            t4 = time.perf_counter()
            n, labels = folder_format.components(mask)
            t5 = time.perf_counter()
            np.bincount(labels.ravel(), minlength=n + 1)
            t6 = time.perf_counter()
            hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()
            t7 = time.perf_counter()
            for key, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
                spent[key] += seconds
        for key, seconds in spent.items():
            best[key] = min(best.get(key, float("inf")), 1000 * seconds / len(pairs))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="bench/startup.py's folder of synthetic sets")
    parser.add_argument("--size", type=int, default=100_000, help="images in the set")
    parser.add_argument("--side", type=int, default=SIDE, help="largest image side in pixels, as in bench/startup.py")
    parser.add_argument("--samples", type=int, default=2000, help="samples timed part by part (best of 3 passes)")
    args = parser.parse_args()
    folder = make_set(Path(args.root), args.size, args.side)
    cores = len(os.sched_getaffinity(0))
    warm_page_cache(folder)  # as bench/startup.py: decoding is measured, not the disk
    marks = phases(folder)
    costs = per_sample(folder, args.samples)
    load = os.getloadavg()
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(cores) + f" | load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared machine)")
    print(f"set: {args.size:,} synthetic images of {args.side * 3 // 4}-{args.side} px, 3 objects each\n")
    print("| phase of a first start | s | share |")
    print("|---|---:|---:|")
    for key, what in PHASES:
        print(f"| {what} | {marks.get(key, 0.0):.2f} | {marks.get(key, 0.0) / marks['total']:.0%} |")
    rest = marks["total"] - sum(marks.get(key, 0.0) for key, _ in PHASES)
    print(f"| the rest (flags, run folder, data summary) | {rest:.2f} | {rest / marks['total']:.0%} |")
    print(f"| **process start to the end of the first step** | **{marks['total']:.2f}** | |\n")
    print("| per sample, one process | ms | / decoding |")
    print("|---|---:|---:|")
    rows = (("decoding the image and the mask (cv2.imread)", "decode"), ("**the check of one sample**", "check"),
            ("  of it: reading the image (decode, RGB)", "image"), ("  reading the mask (decode, binary test)", "mask"),
            ("  connected components", "components"),
            ("  object areas (a counting pass; only with --min_area above 1)", "areas"),
            ("  pixel digest (SHA-256)", "digest"))
    for what, key in rows:
        print(f"| {what} | {costs[key]:.3f} | {costs[key] / costs['decode']:.2f} |")


if __name__ == "__main__":
    main()
