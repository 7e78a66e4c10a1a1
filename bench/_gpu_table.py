"""bench/gpu_check.sh's performance table: per model and precision, a cold epoch (every image
encoded and stored in the embedding cache), the best of the warm epochs (embeddings from the
cache: the step is the prompt encoder, the mask decoder, the loss and AdamW), the warm step
time and the peak of allocated GPU memory. Random weights, synthetic images, one process.

    python bench/_gpu_table.py --data DIR [--models vit_b,vit_h] [--images 16] [--batch_size 2]
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.training.config import TrainConfig  # noqa: E402
from segment_anything.utils.data import MaskDataset, load_records  # noqa: E402
from segment_anything.utils.data.cache import open_cache  # noqa: E402
from segment_anything.utils.data.dataset import collate  # noqa: E402
from segment_anything.utils.trainable import TrainPlan, configure  # noqa: E402
from segment_anything.utils.trainer import SamTrainStep, train_one_epoch  # noqa: E402
from bench._machine import machine_line  # noqa: E402

PRECISIONS = {"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def epoch(sam, decoder_state, records, args, amp_dtype, cache_dir, epochs):
    """Seconds of each epoch, from the starting decoder, with a cache in cache_dir."""
    sam.mask_decoder.load_state_dict(decoder_state)
    cfg = TrainConfig(model_type=args.model, checkpoint="none", image_size=args.image_size, cache_dir=str(cache_dir))
    cache = open_cache(cfg.resolve().cache, sam, amp_dtype, log=False)
    ds = MaskDataset(records, args.image_size, cache=cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers,
                                         pin_memory=args.device == "cuda", persistent_workers=args.workers > 0)
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    device = torch.device(args.device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    times = []
    for e in range(epochs):
        sync(device)
        start = time.perf_counter()
        train_one_epoch(SamTrainStep(sam), sam, loader, opt, sched, scaler, device, amp_dtype, cache=cache, epoch=e)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", default="vit_b,vit_h")
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--warm_epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (peak memory not measured)")
    args = parser.parse_args()
    records = load_records(args.data)[: args.images]
    steps = -(-len(records) // args.batch_size)
    cuda = args.device == "cuda"
    rows = []
    for model in args.models.split(","):
        args.model = model
        torch.manual_seed(0)
        sam = sam_model_registry[model](checkpoint=None, image_size=args.image_size)
        configure(sam, TrainPlan())
        sam.to(args.device)
        decoder_state = copy.deepcopy(sam.mask_decoder.state_dict())
        for name, dtype in PRECISIONS.items():
            with tempfile.TemporaryDirectory(prefix="gpu_check_cache.") as tmp:
                epoch(sam, decoder_state, records[: args.batch_size], args, dtype, Path(tmp) / "warmup", 1)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                cold = epoch(sam, decoder_state, records, args, dtype, Path(tmp) / "run", 1)[0]
                warm = min(epoch(sam, decoder_state, records, args, dtype, Path(tmp) / "run", args.warm_epochs))
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((model, name, len(records) / cold, len(records) / warm, 1000 * warm / steps, peak))
            print(f"# {model} {name} done", file=sys.stderr, flush=True)
        del sam
        if cuda:
            torch.cuda.empty_cache()
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(torch.get_num_threads()))
    print(f"{len(records)} synthetic images at {args.image_size} px, batch {args.batch_size}, {args.workers} loader workers "
          f"(pinned memory), random weights; cold: the first epoch (encoder + store); warm: best of {args.warm_epochs} "
          "epochs from the cache; warm step: prompt encoder + mask decoder + loss + AdamW\n")
    print("| model | precision | cold images/s | warm images/s | warm step ms | peak GiB allocated |")
    print("|---|---|---:|---:|---:|---:|")
    for model, name, cold, warm, step_ms, peak in rows:
        print(f"| {model} | {name} | {cold:.1f} | {warm:.1f} | {step_ms:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
