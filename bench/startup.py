"""Start-up time to the first training step, first and second start, for 1k, 10k and 100k images.

    python bench/startup.py --root /path/to/startup-data            # sizes 1000,10000,100000
    python bench/startup.py --root DIR --sizes 1000,10000
    python bench/startup.py --root DIR --sizes 1000 --side 1024   # larger images (768-1024 px)
    python bench/startup.py --root DIR --sizes 100000 --rounds 3  # three first starts, median shown

Each set is generated once into ROOT (small synthetic images, 3 objects each: 1,000 distinct
pairs, copied under new names for the larger sets; --side S makes them 3S/4 to S pixels a side) and reused by later runs. Per set, run.py
(vit_t, random weights, 64 px, seeded validation split, no embedding cache) starts twice with a
fresh manifest folder: the first start checks every file, the second finds them in the manifest.
Each start ends right after its first training step (the test hook SAM_TEST_FAULT=exit:0:0), so
its wall time is the time to the first step; peak RSS is the largest process's. Every file is
read once before the starts (the page cache holds the set, as it holds the baseline's files). The baseline
is the time to decode every image and mask once in one process, divided by the cores, measured
before and after every first start (interleaved: the speed of a shared machine drifts over minutes),
and each first start is set against the mean of the two measured around it; with --rounds R the
first start runs R times (each with a fresh manifest folder) and the table shows the median round
and the range of the ratios. The index memory is what the checked records of a set hold
(tracemalloc), per image and per object.
"""

import argparse
import gc
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segment_anything.tools.synthetic_data import make_synthetic_dataset  # noqa: E402
from bench._machine import machine_line  # noqa: E402

BASE = 1000
OBJECTS = 3
SIDE = 128  # the longest image side of the default sets


def make_set(root: Path, n: int, side: int = SIDE) -> Path:
    """ROOT/n<N>/train: n image/label pairs (made once; a finished set has its .done marker)."""
    suffix = "" if side == SIDE else f"-s{side}"
    folder = root / f"n{n}{suffix}" / "train"
    if (folder.parent / ".done").is_file():
        return folder
    base = make_synthetic_dataset(root / f"base{suffix}" / "train", n=min(BASE, n), size_range=(side * 3 // 4, side),
                                  seed=1, objects=OBJECTS)
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
        files = sorted((base / sub).iterdir())
        for i in range(n):
            src = files[i % len(files)]
            shutil.copyfile(src, folder / sub / f"{i:06d}{src.suffix}")
    (folder.parent / ".done").write_text("")
    return folder


def warm_page_cache(folder: Path) -> None:
    """Read every file once, so that the starts measure decoding, not the disk: the baseline
    (decode_all_seconds) reads cached files too. A set read last before other jobs filled the
    memory is otherwise read from disk: bench/startup_parts.py's first start of the 100k set took
    61 s so and 39 s from the page cache here."""
    for sub in ("images", "labels"):
        with os.scandir(folder / sub) as entries:
            for entry in entries:
                with open(entry.path, "rb") as f:
                    while f.read(1 << 20):
                        pass


def decode_all_seconds(folder: Path, limit: int = 4000) -> float:
    """Seconds to decode every image and mask once in one process (measured on the first
    `limit` pairs and scaled)."""
    images = sorted((folder / "images").iterdir())
    masks = sorted((folder / "labels").iterdir())
    n = min(limit, len(images))
    start = time.perf_counter()
    for image, mask in zip(images[:n], masks[:n]):
        cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
        cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    return (time.perf_counter() - start) * len(images) / n


RUNNER = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode; "
          "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
          "print(rc, time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss)")


def start(folder: Path, xdg: Path, out: Path):
    """(seconds to the first training step, CPU seconds of all its processes, peak RSS MB) of one
    run.py start. On a shared machine the CPU time is the steadier measure."""
    cmd = [sys.executable, str(REPO / "run.py"), "--train_dir", str(folder), "--model_type", "vit_t", "--checkpoint",
           "none", "--image_size", "64", "--epoch", "1", "--batch_size", "2", "--num_workers", "0", "--dist", "False",
           "--no_cache", "True", "--eval_base", "False", "--output_dir", str(out)]
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg), SAM_TEST_FAULT="exit:0:0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, *cmd], env=env, capture_output=True, text=True)
    rc, seconds, cpu, rss = proc.stdout.split()[-4:]
    if int(rc) != 3:  # the hook's exit status: the first step ran
        sys.exit(f"run.py did not reach its first step (exit {rc}):\n{proc.stderr[-3000:]}")
    return float(seconds), float(cpu), int(rss) / 1024


def index_memory(folder: Path, xdg: Path):
    """(bytes per image, bytes per object) of the checked records (from the warm manifest)."""
    code = ("import gc, sys, tracemalloc\nfrom segment_anything.utils.data import load_records\n"
            "tracemalloc.start()\nrecords = load_records(sys.argv[1])\ngc.collect()\n"
            "print(tracemalloc.get_traced_memory()[0], len(records), sum(r.num_objects for r in records))")
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True, check=True)
    size, images, objects = map(int, out.stdout.split()[-3:])
    return size / images, size / objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder for the synthetic sets (made once, reused)")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--side", type=int, default=SIDE, help="largest image side in pixels (sides from 3/4 of it)")
    parser.add_argument("--rounds", type=int, default=1, help="first starts per set, each between two baseline measurements")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in map(int, args.sizes.split(",")):
        folder = make_set(Path(args.root), n, args.side)
        warm_page_cache(folder)
        with tempfile.TemporaryDirectory(prefix="bench_startup.") as tmp:
            decodes, firsts = [decode_all_seconds(folder) / cores], []
            for r in range(args.rounds):
                xdg = Path(tmp) / f"xdg{r}"
                firsts.append(start(folder, xdg, Path(tmp) / f"first{r}"))
                decodes.append(decode_all_seconds(folder) / cores)
            second = start(folder, xdg, Path(tmp) / "second")
            per_image, per_object = index_memory(folder, xdg)
        # Each first start against the baseline measured just before and just after it.
        ratios = [first[0] * 2 / (decodes[r] + decodes[r + 1]) for r, first in enumerate(firsts)]
        mid = sorted(range(len(firsts)), key=lambda r: ratios[r])[len(firsts) // 2]
        rows.append((n, firsts[mid], second, (decodes[mid] + decodes[mid + 1]) / 2, ratios[mid], min(ratios),
                     max(ratios), per_image, per_object))
        print(f"# {n} done", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(cores) + f" | load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared machine)")
    print(f"synthetic {args.side * 3 // 4}-{args.side} px images, {OBJECTS} objects each, seeded 80/20 split; run.py vit_t at 64 px, random "
          "weights, no embedding cache; time: process start to the end of the first training step\n")
    rounds = f"; median of {args.rounds} first starts (the ratio's range in parentheses)" if args.rounds > 1 else ""
    print("| images | first start s (CPU s) | peak RSS MB | second start s (CPU s) | peak RSS MB "
          f"| decode every file once / cores s | first / that{rounds} | index bytes per image | per object |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, (t1, c1, m1), (t2, c2, m2), decode, ratio, low, high, per_image, per_object in rows:
        spread = f" ({low:.2f}-{high:.2f})" if args.rounds > 1 else ""
        print(f"| {n:,} | {t1:.1f} ({c1:.1f}) | {m1:,.0f} | {t2:.1f} ({c2:.1f}) | {m2:,.0f} | {decode:.1f} | "
              f"{ratio:.2f}{spread} | {per_image:,.0f} | {per_object:,.0f} |")


if __name__ == "__main__":
    main()
