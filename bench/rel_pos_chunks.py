"""One attention of the image encoder (decomposed relative-position bias) by chunk size.

    python bench/rel_pos_chunks.py                          # 64x64 global block, bf16, 2^21..2^24
    python bench/rel_pos_chunks.py --grid 14 --batch 25     # vit_b's 25 windows of 14x14
    python bench/rel_pos_chunks.py --dtype float32 --budgets 19,21,23

rel_pos_attention splits the scores into chunks of at most 2^budget elements (--budgets);
"default" is the size it picks by itself for this dtype. Random q, k, v (12 heads of 64, as
vit_b), no autograd, interleaved rounds, fastest counts. Prints a Markdown table: ms per call,
speed-up over the default, max relative error against the float32 formula with the full bias.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything.modeling.image_encoder import get_rel_pos, rel_pos_attention  # noqa: E402
from bench._machine import machine_line  # noqa: E402


def reference(q, k, v, scale, rel_h, rel_w, grid):
    """The official formula in float32: the full (N, N) bias added to the full score matrix."""
    B, heads, N, C = q.shape
    q, k, v = q.float(), k.float(), v.float()
    Rh, Rw = get_rel_pos(grid, grid, rel_h.float()), get_rel_pos(grid, grid, rel_w.float())
    r_q = q.reshape(B, heads, grid, grid, C)
    bias = (torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)[..., :, None]
            + torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)[..., None, :]).reshape(B, heads, N, N)
    return (torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1) @ v).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="tokens per side (64: a global block at 1024)")
    parser.add_argument("--batch", type=int, default=1, help="samples (windows) per call")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--budgets", default="21,22,23,24", help="log2 of the chunk sizes to time")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    heads, C, N = 12, 64, args.grid**2
    q, k, v = (torch.randn(args.batch, heads, N, C, generator=gen).to(dtype) for _ in range(3))
    rel_h, rel_w = ((torch.randn(2 * args.grid - 1, C, generator=gen) * 0.3).to(dtype) for _ in range(2))
    scale = C**-0.5
    with torch.inference_mode():
        ref = reference(q, k, v, scale, rel_h, rel_w, args.grid)
        cases = {"default": None, **{f"2^{b}": 2 ** int(b) for b in args.budgets.split(",")}}
        best = {name: float("inf") for name in cases}
        errors = {}
        for round_ in range(args.repeats + 1):
            for name, budget in cases.items():
                start = time.perf_counter()
                extra = () if budget is None else (budget,)  # None: the function's own default
                out = rel_pos_attention(q, k, v, scale, rel_h, rel_w, (args.grid, args.grid), *extra)
                seconds = time.perf_counter() - start
                if round_ == 0:
                    errors[name] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                else:
                    best[name] = min(best[name], seconds)

    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads))
    print(f"attention: {args.batch} x {heads} heads x {N} tokens ({args.grid}x{args.grid}) of {C}, {args.dtype}, "
          f"no autograd; best of {args.repeats} interleaved rounds after 1 warm-up round\n")
    print("| chunk (scores) | ms / call | speed-up vs default | max rel. error vs float32 formula |")
    print("|---|---:|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1000:,.0f} | {best['default'] / seconds:.2f}x | {errors[name]:.1e} |")


if __name__ == "__main__":
    main()
