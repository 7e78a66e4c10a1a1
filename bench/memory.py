"""Peak memory and time of one training step with the image encoder training: full encoder vs
LoRA adapters, each with and without --grad_checkpoint.

One step = encoder forward on one image, decoder with one box, default loss at the low-res grid
size, backward, AdamW step. Every case runs in a fresh subprocess (so one case's allocations
cannot lower another's peak); rounds interleave the cases. On CPU the peak is the process's
peak resident set size (ru_maxrss), reported with the resident size before the step (model and
optimizer built) subtracted as well; on CUDA it is torch.cuda.max_memory_allocated.

    python bench/memory.py                      # vit_b at 1024, 1 round
    python bench/memory.py --image_size 512 --repeats 2
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
from segment_anything.build_sam import MODEL_TYPES  # noqa: E402

CASES = {  # name -> (TrainPlan keyword arguments, description)
    "full": (dict(parts=("image_encoder", "mask_decoder")), "full encoder + decoder"),
    "full_ckpt": (dict(parts=("image_encoder", "mask_decoder"), grad_checkpoint=True), "full encoder + decoder, --grad_checkpoint"),
    "lora": (dict(lora_rank=4), "LoRA r=4 (qkv, proj) + decoder"),
    "lora_ckpt": (dict(lora_rank=4, grad_checkpoint=True), "LoRA r=4 (qkv, proj) + decoder, --grad_checkpoint"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_case(name: str, model_type: str, image_size: int, device: str) -> dict:
    from segment_anything import sam_model_registry
    from segment_anything.utils.trainable import TrainPlan, configure, parameter_counts, set_train_mode

    torch.manual_seed(0)
    dev = torch.device(device)
    sam = sam_model_registry[model_type](image_size=image_size)
    configure(sam, TrainPlan(**CASES[name][0]))
    sam.to(dev)
    set_train_mode(sam)
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    image = torch.randn(1, 3, image_size, image_size, device=dev)
    box = torch.tensor([[image_size * 0.2, image_size * 0.2, image_size * 0.7, image_size * 0.8]], device=dev)
    target = torch.zeros(1, image_size // 4, image_size // 4, device=dev)
    target[:, image_size // 16 : image_size // 5, image_size // 16 : image_size // 6] = 1
    before = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    emb = sam.image_encoder(image)
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
    low, iou = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(low[:, 0], target) + (iou ** 2).mean()
    loss.backward()
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak, base = torch.cuda.max_memory_allocated() / 2**20, float("nan")
    else:
        peak, base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before
    return {"case": name, "seconds": seconds, "peak_mb": peak, "before_mb": base,
            "trainable": parameter_counts(sam)["all"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="vit_b", choices=MODEL_TYPES)
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best round counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--mem_limit_gb", type=float, default=9.0,
                        help="CPU: address-space limit per case, so a case that does not fit fails alone instead of "
                             "waking the kernel's OOM killer on a shared machine (0 = none)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        if args.device == "cpu" and args.mem_limit_gb > 0:
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print("RESULT " + json.dumps(one_case(args.case, args.model_type, args.image_size, args.device)))
        return

    best = {}
    for _ in range(args.repeats):
        for name in args.cases.split(","):
            cmd = [sys.executable, __file__, "--case", name, "--model_type", args.model_type, "--image_size",
                   str(args.image_size), "--device", args.device, "--threads", str(args.threads),
                   "--mem_limit_gb", str(args.mem_limit_gb)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if "RESULT " not in proc.stdout:
                failed = "out of memory" if "memory" in proc.stderr.lower() or proc.returncode == -9 else "failed"
                best.setdefault(name, {"failed": f"{failed} (exit {proc.returncode})"})
                continue
            r = json.loads(proc.stdout.split("RESULT ", 1)[1])
            if "failed" in best.get(name, {}):
                best.pop(name)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = {**r, "peak_mb": min(r["peak_mb"], best.get(name, r)["peak_mb"])}
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads) + f", device {args.device}" + (f", {args.mem_limit_gb:g} GB address-space limit per case"
                                     if args.device == "cpu" and args.mem_limit_gb > 0 else ""))
    print(f"model: {args.model_type}, 1 image {args.image_size}x{args.image_size}, one box, one training step "
          f"(forward, backward, AdamW), fresh process per case, best of {args.repeats} interleaved round(s)")
    print()
    memory = "peak RSS MB" if args.device == "cpu" else "peak CUDA MB"
    print(f"| case | trainable parameters | step s | {memory} | of which the step |")
    print("|---|---:|---:|---:|---:|")
    for name, r in best.items():
        if "failed" in r:
            limit = f", limit {args.mem_limit_gb:g} GB" if args.device == "cpu" and args.mem_limit_gb > 0 else ""
            print(f"| {CASES[name][1]} | | {r['failed']}{limit} | | |")
            continue
        step_mb = r["peak_mb"] - r["before_mb"] if args.device == "cpu" else r["peak_mb"]
        print(f"| {CASES[name][1]} | {r['trainable']:,} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} | {step_mb:,.0f} |")


if __name__ == "__main__":
    main()
