"""Does torch.compile of the image encoder pay for the embedding pass? Compile time and speed.

    python bench/encoder_compile.py                        # vit_b at 1024, bf16 autocast
    python bench/encoder_compile.py --precision float32 --model_type vit_t

Random weights, one image, inference mode. The compiled encoder's first call (the compilation,
inductor's CPU code generation included) is timed on its own; then eager and compiled passes
alternate for --repeats rounds and the fastest of each counts. "Pays after" is the compile time
divided by the time saved per image: a run whose cold epoch encodes fewer images than that is
faster eagerly. A compilation that fails or runs past --max_compile_s is reported as such.
"""

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.build_sam import MODEL_TYPES  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from bench._machine import machine_line  # noqa: E402


def timed(encoder, x, bf16: bool):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        out = encoder(x)
    return time.perf_counter() - start, out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="vit_b", choices=MODEL_TYPES)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "float32"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved eager/compiled rounds after the compilation")
    parser.add_argument("--max_compile_s", type=float, default=1800, help="give up on a compilation this long")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16"
    side = 1024
    encoder = sam_model_registry[args.model_type]().image_encoder.eval()
    randomize_(encoder, seed=0)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    eager_s, eager_out = timed(encoder, x, bf16)  # warm-up (and the reference output)

    compiled = torch.compile(encoder)
    result = {}

    def compile_first_call():
        try:
            result["seconds"], result["out"] = timed(compiled, x, bf16)
        except Exception as err:  # noqa: BLE001 - reported in the table
            result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"

    start = time.perf_counter()
    worker = threading.Thread(target=compile_first_call, daemon=True)
    worker.start()
    worker.join(args.max_compile_s)
    compile_s = time.perf_counter() - start

    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads))
    print(f"model: {args.model_type} image encoder, 1 image {side}x{side}, {args.precision}, random weights")
    if worker.is_alive() or "error" in result:
        why = result.get("error") or f"not finished after {compile_s:,.0f} s"
        print(f"\ncompilation: {why}; eager pass {eager_s * 1000:,.0f} ms")
        return
    eager, fast = [], []
    for _ in range(args.repeats):
        eager.append(timed(encoder, x, bf16)[0])
        fast.append(timed(compiled, x, bf16)[0])
    e, c = min(eager), min(fast)
    err = ((result["out"] - eager_out).abs().max() / eager_out.abs().max()).item()
    saved = e - c
    pays = f"{compile_s / saved:,.0f} images" if saved > 0 else "never (not faster)"
    print(f"best of {args.repeats} interleaved rounds after the compilation\n")
    print("| compile s (first call) | eager ms / image | compiled ms / image | speed-up | pays after | max rel. difference |")
    print("|---:|---:|---:|---:|---|---:|")
    print(f"| {compile_s:,.1f} | {e * 1000:,.0f} | {c * 1000:,.0f} | {e / c:.2f}x | {pays} | {err:.1e} |")


if __name__ == "__main__":
    main()
