"""Reading one embedding-cache entry: the lookup as it runs in training, and its checksum alone.

    python bench/cache_read.py                 # a (256, 64, 64) fp16 entry: vit_b/l/h at 1024, 2 MB
    python bench/cache_read.py --grid 32       # the entry of a 512 px run

Every lookup reads the entry's file (from the page cache here: the entry was just written),
checks its header and its SHA-256 checksum and builds the tensor. The earlier entry format's
BLAKE2b checksum of the same payload is timed beside it. Rounds are interleaved (a lookup, then
each checksum, round after round) and the table shows the median per call.
"""

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._machine import machine_line  # noqa: E402
from segment_anything.utils.data.cache import HEADER, EmbeddingCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="the embedding's side (64 for 1024 px inputs)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if args.grid < 1 or args.rounds < 1:
        parser.error("--grid and --rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_cache.") as tmp:
        cache = EmbeddingCache(Path(tmp), "fp16")
        key = "ab" * 20
        cache.store(key, torch.randn(256, args.grid, args.grid))
        payload = cache.path(key).read_bytes()[HEADER.size:]
        timed = {
            "lookup (read, check, tensor)": lambda: cache.lookup(key),
            "SHA-256 of the payload (this format)": lambda: hashlib.sha256(payload).digest(),
            "BLAKE2b of the payload (the earlier format)": lambda: hashlib.blake2b(payload, digest_size=32).digest(),
        }
        spent = {name: [] for name in timed}
        for _ in range(args.rounds):
            for name, call in timed.items():
                start = time.perf_counter()
                call()
                spent[name].append(time.perf_counter() - start)
        assert cache.stats.hits == args.rounds
    print("command: python bench/cache_read.py " + " ".join(sys.argv[1:]))
    print(machine_line(torch.get_num_threads()))
    print(f"entry: (256, {args.grid}, {args.grid}) fp16, {len(payload) / 2**20:.1f} MB of payload; "
          f"median of {args.rounds} interleaved rounds\n")
    print("| per entry | ms |")
    print("|---|---:|")
    for name, times in spent.items():
        print(f"| {name} | {1000 * statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
