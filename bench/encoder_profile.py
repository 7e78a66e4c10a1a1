"""Where the image encoder's time goes: torch.profiler by op, and by block type.

    python bench/encoder_profile.py                 # vit_b at 1024, float32 then bf16 autocast
    python bench/encoder_profile.py --top 10

One image, random weights, inference mode, one warm-up pass then one profiled pass per
precision. Prints each op's self time and share of the pass, and the total time of the
windowed and of the global blocks (a block's time includes its ops). Profiling adds its own
overhead: the shares are the point, bench/encoder.py gives the times.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from bench._machine import machine_line  # noqa: E402


def label_blocks(encoder: torch.nn.Module) -> None:
    """Wrap each block's forward in a profiler range named after its kind."""
    for block in encoder.blocks:
        kind = "global" if block.window_size == 0 else "windowed"

        def forward(x, _forward=block.forward, _kind=kind):
            with record_function(f"block: {_kind}"):
                return _forward(x)

        block.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--top", type=int, default=12, help="ops listed per precision")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = randomize_(sam_model_registry[args.model_type]().image_encoder.eval(), seed=0)
    label_blocks(encoder)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))

    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads))
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            encoder(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                encoder(x)
                seconds = time.perf_counter() - start
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{args.model_type} at 1024, {'bf16 autocast' if bf16 else 'float32'}: {seconds * 1000:,.0f} ms profiled\n")
        print("| op | self ms | share | calls |")
        print("|---|---:|---:|---:|")
        ops = [e for e in events if not e.key.startswith("block: ")]
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1000:,.0f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")
        for e in events:
            if e.key.startswith("block: "):
                print(f"| ({e.key}, total) | {e.cpu_time_total / 1000:,.0f} | {e.cpu_time_total / total:.1%} | {e.count} |")


if __name__ == "__main__":
    main()
