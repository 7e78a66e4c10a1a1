"""Image encoder time and peak memory: standard attention vs FFT token mixing (--attention fft).

One image, random weights, forward under torch.no_grad (inference; training memory would add
the activations kept for backward, for both alike). FFT mixing replaces the global-attention
blocks (--fft_blocks, default global); the windowed blocks are the same code in both cases.
Every case runs in a fresh subprocess with an address-space limit (RLIMIT_AS), so a case that
does not fit fails alone as "out of memory" instead of taking the shared machine down; rounds
interleave the cases and the best time counts. Sizes below 2048 get one untimed warm-up
forward first. Peak memory is the process's peak resident set size (ru_maxrss), also given
minus the resident size with the model built (what the forward itself needs).

    python bench/attention.py                            # vit_b at 256, 512, 1024, 2048
    python bench/attention.py --sizes 256,512 --repeats 3
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._machine import machine_line  # noqa: E402
from segment_anything.build_sam import VIT_CONFIGS  # noqa: E402

ATTENTIONS = ("standard", "fft")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_case(attention: str, model_type: str, size: int, fft_blocks: str) -> dict:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    options = {"attention": "fft", "fft_blocks": fft_blocks} if attention == "fft" else {}
    encoder = sam_model_registry[model_type](image_size=size, **options).image_encoder.eval()
    image = torch.randn(1, 3, size, size)
    before = rss_mb()
    with torch.no_grad():
        if size < 2048:
            encoder(image)
        t0 = time.perf_counter()
        encoder(image)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak, "before_mb": before}


def run_case(args: argparse.Namespace, attention: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--case", attention, "--sizes", str(size), "--model_type", args.model_type,
           "--fft_blocks", args.fft_blocks, "--threads", str(args.threads), "--mem_limit_gb", str(args.mem_limit_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if "RESULT " in proc.stdout:
        return json.loads(proc.stdout.split("RESULT ", 1)[1])
    oom = proc.returncode == -9 or any(w in proc.stderr.lower() for w in ("memory", "bad_alloc", "alloc"))
    return {"failed": f"{'out of memory' if oom else 'failed'} (exit {proc.returncode})"}


def cell(r: dict, key: str, fmt: str) -> str:
    return r["failed"] if "failed" in r else format(r[key], fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="vit_b", choices=list(VIT_CONFIGS))
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--fft_blocks", default="global")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best time counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--mem_limit_gb", type=float, default=12.0, help="address-space limit per case (0 = none)")
    parser.add_argument("--note", default="", help="appended to the machine line (e.g. 'shared with other jobs')")
    parser.add_argument("--case", choices=ATTENTIONS, help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.case:
        if args.mem_limit_gb > 0:
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print("RESULT " + json.dumps(one_case(args.case, args.model_type, sizes[0], args.fft_blocks)))
        return

    best = {}
    for _ in range(args.repeats):
        for size in sizes:
            for attention in ATTENTIONS:
                r, old = run_case(args, attention, size), best.get((attention, size))
                if old is None or "failed" in old or ("failed" not in r and r["seconds"] < old["seconds"]):
                    best[(attention, size)] = r
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads) + (f", {args.mem_limit_gb:g} GB address-space limit per case" if args.mem_limit_gb else "")
          + (f"; {args.note}" if args.note else ""))
    print(f"model: {args.model_type} image encoder, random weights, 1 image, forward under no_grad; FFT mixing in "
          f"blocks: {args.fft_blocks}; fresh process per case, best of {args.repeats} interleaved round(s)")
    print()
    print("| input px | tokens in a global block | standard s | FFT s | standard / FFT time "
          "| standard peak RSS MB (forward) | FFT peak RSS MB (forward) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        s, f = best[("standard", size)], best[("fft", size)]
        ratio = f"{s['seconds'] / f['seconds']:.2f}" if "failed" not in s and "failed" not in f else "—"
        mem = [r["failed"] if "failed" in r else f"{r['peak_mb']:,.0f} ({r['peak_mb'] - r['before_mb']:,.0f})" for r in (s, f)]
        print(f"| {size} | {(size // 16) ** 2:,} | {cell(s, 'seconds', '.2f')} | {cell(f, 'seconds', '.2f')} | {ratio} "
              f"| {mem[0]} | {mem[1]} |")


if __name__ == "__main__":
    main()
