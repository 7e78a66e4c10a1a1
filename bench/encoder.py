"""Image-encoder speed: ours vs the official implementation, same random weights, one process.

    python bench/encoder.py                      # vit_b at 1024, float32 and bf16 autocast
    python bench/encoder.py --model_type vit_t --repeats 5

The official encoder is MobileSAM's copy of Meta's modeling code (package mobilesam-mirror,
imported as mobile_sam). Prints a Markdown table: ms per image, speed-up over the official
float32 encoder, max relative error (max |ours - official_fp32| / max |official_fp32|), and
each time as a multiple of this machine's floor: the encoder's floating-point operations
(counted with torch.utils.flop_counter on the official encoder, windowed padding included)
divided by the rate of a large square matrix product measured in the same run, in float32
and in bf16 (the floor for the bf16 autocast rows).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.build_sam import MODEL_TYPES  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from bench._machine import gemm_rate, machine_line  # noqa: E402


def official_encoder(model_type: str) -> torch.nn.Module:
    warnings.filterwarnings("ignore")  # mobile_sam re-registers timm models on import
    import mobile_sam

    return mobile_sam.sam_model_registry[model_type]().image_encoder.eval()


def count_flops(encoder: torch.nn.Module, side: int) -> int:
    """Floating-point operations (2 per multiply-add) of one forward, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    import copy

    meta = copy.deepcopy(encoder).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty(1, 3, side, side, device="meta"))
    return counter.get_total_flops()


def run_once(encoder, x, bf16: bool):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        out = encoder(x)
    return (time.perf_counter() - start) * 1000, out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="vit_b", choices=MODEL_TYPES)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (plus one warm-up round)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip_official_bf16", action="store_true", help="skip the slowest row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours = sam_model_registry[args.model_type]().image_encoder.eval()
    randomize_(ours, seed=0)
    official = official_encoder(args.model_type)
    official.load_state_dict(ours.state_dict(), strict=True)
    official.eval()  # again after loading: MobileSAM's TinyViT caches its attention biases in eval()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))

    rows = [("official", official, False), ("ours", ours, False), ("ours", ours, True)]
    if not args.skip_official_bf16:
        rows.insert(1, ("official", official, True))
    # Rounds interleave the encoders, and the best round counts: on a shared machine a
    # neighbour's load then slows every row alike instead of whichever ran at the time.
    times = {(name, bf16): [] for name, _, bf16 in rows}
    outputs = {}
    rates = {False: [], True: []}
    for round_ in range(args.repeats + 1):
        for bf16 in rates:  # the GEMM rate in the same rounds, so it sees the same neighbours
            rates[bf16].append(gemm_rate(torch.bfloat16 if bf16 else torch.float32))
        for name, enc, bf16 in rows:
            ms, outputs[(name, bf16)] = run_once(enc, x, bf16)
            if round_ > 0:  # round 0 is the warm-up
                times[(name, bf16)].append(ms)
    results = {key: (min(ms), outputs[key]) for key, ms in times.items()}
    base_ms, base_out = results[("official", False)]
    flops = count_flops(official, 1024)
    floor_ms = {bf16: flops / max(r) * 1000 for bf16, r in rates.items()}

    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads))
    print(f"model: {args.model_type} image encoder, 1 image 1024x1024, best of {args.repeats} interleaved rounds after 1 warm-up round")
    print(f"work: {flops / 1e12:.3f} TFLOP per image (official encoder, windowed padding included)")
    for bf16, name in ((False, "float32"), (True, "bf16")):
        print(f"floor {name}: 4096^3 matmul at {max(rates[bf16]) / 1e9:,.0f} GFLOP/s (best of the rounds) "
              f"-> {floor_ms[bf16]:,.0f} ms / image")
    print("\n| encoder | precision | ms / image | speed-up vs official fp32 | x floor | max rel. error vs official fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, bf16), (ms, out) in results.items():
        err = ((out - base_out).abs().max() / base_out.abs().max()).item()
        print(f"| {name} | {'bf16 autocast' if bf16 else 'float32'} | {ms:,.0f} | {base_ms / ms:.2f}x "
              f"| {ms / floor_ms[bf16]:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
