"""How long a process takes to end after its last line, with and without skip_collection_at_exit.

    python bench/exit.py --rounds 5

Each round starts, in alternation, `python -c` programs that import torch and this package's
training launcher (as a worker does), print the time and end: one as is, one that first calls
utils.process.skip_collection_at_exit() (as run.py's workers and the tools do). The time from that
print to the end of the process, seen by this script, is the exit time. Prints one table with the
command and the machine line.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._machine import machine_line  # noqa: E402

PROGRAM = ("import sys; sys.path.insert(0, {repo!r}); import torch, time; "
           "import segment_anything.training.launch as launch; "
           "{setup}print(time.time(), flush=True)")
VARIANTS = {
    "as is": "",
    "skip_collection_at_exit()": "from segment_anything.utils.process import skip_collection_at_exit; "
                                 "skip_collection_at_exit(); ",
}


def exit_seconds(setup: str) -> float:
    code = PROGRAM.format(repo=str(REPO), setup=setup)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    printed = float(proc.stdout.readline())
    proc.wait()
    return time.time() - printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, setup in VARIANTS.items():
            times[name].append(exit_seconds(setup))
    load = os.getloadavg()[0]
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(len(os.sched_getaffinity(0))) + f" | 1-minute load average {load:.1f}")
    print(f"{args.rounds} interleaved rounds; seconds from the program's last line to the end of its process\n")
    print("| exit | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
