"""Training speed: the reference loop vs our trainer's cold and warm epochs, same data and weights.

    python bench/train.py                          # vit_b at 1024 on ../shared/data/nails
    python bench/train.py --model_type vit_t --images 8
    python bench/train.py --model_type vit_t --compile    # adds a row: warm epochs with --compile
    python bench/train.py --amp bf16                      # adds rows: cold and warm epochs in bf16 autocast

(a) reference: the official modules (mobile_sam, Meta's modeling code), one image per step,
    the image encoder under no_grad on every step, the decoder once per image, as the seed
    reference project does; (b) ours, first epoch: the embedding cache is empty, every image is
    encoded once and stored; (c) ours, later epochs: every embedding comes from the cache; with --compile also (d) the same
warm epochs with the decoder step compiled (training/compile.py; the best epoch counts, so the
compilation in the first one is left out and reported apart, with the number of graphs compiled).
Every phase runs in its own process (same random weights, same images, one box per image from
its mask, the same loss and AdamW), so each peak RSS is that phase's own; --rounds repeats the
whole sequence of phases (interleaved, so a slow spell of a shared machine hits all of them)
and each phase's fastest round counts. Prints a Markdown
table: images per second, peak memory (RSS on CPU, max allocated on CUDA) and the ratios,
then the time to a fine-tuned model (1 cold + 9 warm epochs) with the share spent encoding.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.build_sam import MODEL_TYPES  # noqa: E402
from segment_anything.training.compile import compile_decode  # noqa: E402
from segment_anything.training.config import TrainConfig  # noqa: E402
from segment_anything.utils.data import MaskDataset, load_records  # noqa: E402
from segment_anything.utils.data.cache import open_cache  # noqa: E402
from segment_anything.training.engine import amp_dtype_for  # noqa: E402
from segment_anything.utils.losses import DEFAULT_LOSS_SPEC  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from segment_anything.utils.trainable import TrainPlan, configure  # noqa: E402
from segment_anything.utils.trainer import SamTrainStep, train_one_epoch  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402
from bench._machine import machine_line  # noqa: E402


def our_model(args, device):
    sam = sam_model_registry[args.model_type](checkpoint=None, image_size=args.image_size)
    randomize_(sam, seed=0)
    configure(sam, TrainPlan())
    return sam.to(device)


def reference_model(args, device):
    warnings.filterwarnings("ignore")  # mobile_sam re-registers timm models on import
    import mobile_sam

    sam = mobile_sam.sam_model_registry[args.model_type]()
    sam.load_state_dict(our_model(args, torch.device("cpu")).state_dict(), strict=True)
    sam.image_encoder.eval().requires_grad_(False)  # eval again after loading (TinyViT caches biases)
    sam.prompt_encoder.eval().requires_grad_(False)
    sam.mask_decoder.train()
    return sam.to(device)


def dataset(args, image_size, cache=None):
    return MaskDataset(load_records(args.data)[: args.images], image_size, cache=cache)


def optimizer(sam):
    return torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-5)


def reference_epoch(sam, ds, device) -> float:
    """The seed project's loop: per image, encoder under no_grad, then prompt + decoder + loss."""
    opt = optimizer(sam)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    start = time.perf_counter()
    for i in range(len(ds)):
        item = ds[i]
        image = sam.preprocess(item["image"].to(device).float())[None]
        with torch.no_grad():
            embedding = sam.image_encoder(image)
            box = transform.apply_boxes_torch(item["boxes"], item["original_size"]).to(device)
            sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        low_res, iou_pred = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=False)
        logits = sam.postprocess_masks(low_res, item["input_size"], item["original_size"])
        loss = DEFAULT_LOSS_SPEC(logits[:, 0], item["masks"].to(device), iou_pred[:, 0])["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def our_epochs(args, device, warm: bool, compiled: bool = False, amp: str = "off") -> list:
    """Seconds per epoch of train_one_epoch: one cold epoch, or --warm_epochs from a warm cache."""
    sam = our_model(args, device)
    step = compile_decode(SamTrainStep(sam)) if compiled else SamTrainStep(sam)
    cfg = TrainConfig(model_type=args.model_type, checkpoint="none", image_size=args.image_size,
                      cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, amp=amp)
    amp_dtype = amp_dtype_for(cfg, device)  # as run.py chooses it
    cache = open_cache(cfg.resolve().cache, sam, amp_dtype, log=False)  # the compute dtype is part of the key
    ds = dataset(args, args.image_size, cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=list, num_workers=args.workers)
    opt = optimizer(sam)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    times = []
    for _ in range(args.warm_epochs if warm else 1):
        start = time.perf_counter()
        m = train_one_epoch(step, sam, loader, opt, sched, scaler, device, amp_dtype, cache=cache)
        times.append(time.perf_counter() - start)
        expected = len(ds) if warm else 0
        assert m["cache_hits"] == expected, f"{m['cache_hits']} cache hits, expected {expected}"
    return times


def peak_memory(device) -> float:
    """MB: max allocated on CUDA, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(args) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.phase == "reference":
        sam = reference_model(args, device)  # the stock modules only run at their own size (1024)
        ds = dataset(args, sam.image_encoder.img_size)
        times = [reference_epoch(sam, ds, device)]
    else:
        times = our_epochs(args, device, warm=not args.phase.startswith("cold"), compiled=args.phase == "compiled",
                           amp=args.amp if args.phase.endswith("_amp") else "off")
    extra = {}
    if args.phase == "compiled":
        from torch._dynamo.utils import counters  # dynamo's own statistics; private, used only here

        extra = {"graphs": counters["stats"]["unique_graphs"], "first_s": times[0]}
    print(json.dumps({"seconds": min(times), "images": args.images, "peak_mb": peak_memory(device), **extra}))


JOB_EPOCHS = 10  # the job a user runs: one cold epoch, then warm ones from the cache


def print_job_time(results: dict, amp) -> None:
    """The job as a user sees it: wall time of 1 cold + 9 warm epochs over these images.

    From the phases measured above (each phase's fastest round): the reference loop runs every
    epoch alike; ours pays the cold epoch once. The share spent encoding is the cold epoch's
    excess over a warm one (the encoder's pass and the cache writes) over the whole job. With
    --compile the first warm epoch counts with its compilation."""
    ref = results["reference"]["seconds"] * JOB_EPOCHS
    rows = [("reference (stock modules, encoder every step)", ref, None)]
    pairs = [("ours, default flags", "cold", "warm")]
    if "cold_amp" in results:
        pairs.append((f"ours, --amp {amp}", "cold_amp", "warm_amp"))
    if "compiled" in results:
        pairs.append(("ours, --compile", "cold", "compiled"))
    for name, cold, warm in pairs:
        cold_s, warm_s = results[cold]["seconds"], results[warm]["seconds"]
        # --compile's first warm epoch includes the compilation
        first_warm = results[warm].get("first_s", warm_s)
        total = cold_s + first_warm + (JOB_EPOCHS - 2) * warm_s
        rows.append((name, total, max(0.0, cold_s - warm_s) / total))
    print(f"\ntime to a fine-tuned model: 1 cold + {JOB_EPOCHS - 1} warm epochs on these images\n")
    print("| loop | wall time s | vs reference | share spent encoding |")
    print("|---|---:|---:|---:|")
    for name, total, share in rows:
        print(f"| {name} | {total:,.1f} | {ref / total:.2f}x | {'every step' if share is None else f'{share:.0%}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="vit_b", choices=MODEL_TYPES)
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nails"))
    parser.add_argument("--images", type=int, default=6, help="images per epoch (the first N of the data)")
    parser.add_argument("--batch_size", type=int, default=1, help="our trainer's images per step")
    parser.add_argument("--workers", type=int, default=0, help="our trainer's DataLoader workers")
    parser.add_argument("--warm_epochs", type=int, default=3, help="warm epochs; the best one counts")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run every phase this many times, interleaved; each phase's fastest round counts")
    parser.add_argument("--cache_dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="add a row: warm epochs with the decoder step compiled")
    parser.add_argument("--amp", choices=["bf16"], help="add rows: our cold and warm epochs with --amp this dtype "
                        "(bf16 pays on CPUs with AVX512-BF16 or AMX, see the machine line)")
    parser.add_argument("--phase", choices=["reference", "cold", "warm", "compiled", "cold_amp", "warm_amp"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return run_phase(args)

    results = {}
    phases = ("reference", "cold", "warm") + (("cold_amp", "warm_amp") if args.amp else ())
    phases += ("compiled",) if args.compile else ()
    for _ in range(args.rounds):  # every phase once per round, a fresh cache per round
        with tempfile.TemporaryDirectory(prefix="bench_train_cache.") as cache_dir:
            for phase in phases:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--cache_dir", cache_dir]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{phase} phase failed:\n{proc.stderr[-4000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                best = results.setdefault(phase, r)  # fastest round; the highest peak memory of any
                results[phase] = dict(r if r["seconds"] < best["seconds"] else best,
                                      peak_mb=max(r["peak_mb"], best["peak_mb"]))

    memory = "max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads))
    print(f"model: {args.model_type} at {args.image_size} (reference: at 1024, the stock modules' size), {args.images} images of {Path(args.data).name}, one box per object (the same in both loops); "
          f"our batch {args.batch_size}, cache {args.cache_dtype}; warm: best of {args.warm_epochs} epochs; "
          f"each phase: fastest of {args.rounds} interleaved rounds, highest peak memory\n")
    print(f"| loop | images / s | vs reference | {memory} MB | vs reference |")
    print("|---|---:|---:|---:|---:|")
    ref = results["reference"]
    names = {"reference": "reference (stock modules, encoder every step)", "cold": "ours, first epoch (cold cache)",
             "warm": "ours, later epochs (warm cache)", "compiled": "ours, later epochs (warm cache), --compile",
             "cold_amp": f"ours, first epoch (cold cache), --amp {args.amp}",
             "warm_amp": f"ours, later epochs (warm cache), --amp {args.amp}"}
    for phase, r in results.items():
        ips = r["images"] / r["seconds"]
        print(f"| {names[phase]} | {ips:.3g} | {ips / (ref['images'] / ref['seconds']):.2f}x | "
              f"{r['peak_mb']:,.0f} | {r['peak_mb'] / ref['peak_mb']:.2f}x |")
    print_job_time(results, args.amp)
    if "compiled" in results:
        c = results["compiled"]
        print(f"\n--compile: {c['graphs']} graphs compiled; first warm epoch {c['first_s']:.1f} s (compilation included), "
              f"best {c['seconds']:.2f} s; warm epoch with/without: {results['warm']['seconds'] / c['seconds']:.2f}x the images / s")


if __name__ == "__main__":
    main()
