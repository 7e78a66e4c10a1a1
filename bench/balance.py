"""Rank balance: how long the faster of 2 processes waits for the slower one at every step, with
batches of images and with --objects_per_step.

    python bench/balance.py                                   # nuclei, vit_t at 256, 3 rounds, both loss sizes
    python bench/balance.py --modes counts objects --loss_sizes original --rounds 5
    python bench/balance.py --modes counts --decode_pixels 1 2 4 --loss_sizes original
    python bench/balance.py --loss_sizes low_res --rounds 5
    python bench/balance.py --objects_per_step 64 --image_size 512

Two gloo processes, one thread each, train the mask decoder on ../shared/data/nuclei-objects (12
images, 10-179 objects each, all 12 used for training) through the run's own loader
(training/engine.make_loaders, so the same samplers and items as run.py) with a warm embedding
cache (every image is encoded and stored before the timed epochs), so the decoder step is
the work. Each mode is one configuration of the loader:

    images   --batch_size 1 --max_objects 1000: one image per process per step, all its objects
    capped   --batch_size 1 (--max_objects 16, the default): at most 16 objects per image per step
    objects  --objects_per_step N (default: the mean objects per image, rounded up, so a step
             trains as many objects as in the images mode on average): steps cut by each
             object's estimated cost (the run's sampler)
    counts   the same, with the steps cut every N objects whatever they cost (the sampler
             without costs: how --objects_per_step cut steps before it weighed objects)
    objects@X  (with --decode_pixels X ...) the objects mode with another constant of the
             sampler's cost model (what one decoding is worth in loss pixels, over image_size^2)

Each step is timed in parts on each rank: compute (batch preparation, forward, loss, backward,
optimizer), the two waits for the other rank (the prompt-count all-reduce before the loss, and a
one-element all-reduce right before the gradients'), and the gradient all-reduce itself (one flat
buffer, both ranks there already: transfer only). The faster rank's wait of a step is the larger
of the two ranks' waits. On a machine that other jobs share, a rank that loses its core for a
while waits or makes wait like a rank with more work; the last column therefore gives the work
gap alone, from CPU time (process_time) of the compute parts: per step, the slower rank's CPU
time minus the faster rank's, as a share of the slower rank's (what the faster rank would wait
on an idle machine, the all-reduce left out), and the images per second that the slower rank's
CPU time plus the all-reduce would give (an estimate for an idle machine, where the two ranks
do not take turns on the cores with other jobs). Items are read from the loader before the timed
epoch (reading the mask files is not the step). Every mode runs with each --loss_sizes; the rows
take turns within every round (interleaved), each epoch in the same image order; the first
epoch of each row is a warm-up and not counted. Prints one Markdown table with the command and
the machine line (with the load average before and after).
"""

import argparse
import copy
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _machine import machine_line  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.training.config import TrainConfig  # noqa: E402
from segment_anything.training.engine import make_loaders  # noqa: E402
from segment_anything.training.tasks import build_task  # noqa: E402
from segment_anything.utils.process import keep_freed_memory  # noqa: E402
from segment_anything.utils.accumulate import global_count  # noqa: E402
from segment_anything.utils.data import RunData, load_records  # noqa: E402
from segment_anything.utils.data.dataset import collate  # noqa: E402
from segment_anything.utils.data.samplers import ObjectBatchSampler, object_cost, piece_cost  # noqa: E402
from segment_anything.utils.data.cache import open_cache  # noqa: E402
from segment_anything.utils.distributed import DistInfo, all_gather_objects  # noqa: E402
from segment_anything.utils.trainable import configure, set_train_mode  # noqa: E402
from segment_anything.utils.trainer import batch_embeddings, prepare_batch, step_loss  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nuclei-objects"
WORLD = 2


def mode_flags(case: str, per_step: int) -> dict:
    """case: "<mode>/<loss size>"."""
    mode, loss_size = case.split("/")
    mode = "objects" if mode.startswith("objects@") else mode
    by_objects = {"objects_per_step": per_step, "max_objects": 1000}
    return {**{"images": {"batch_size": 1, "max_objects": 1000}, "capped": {"batch_size": 1},
               "objects": by_objects, "counts": by_objects}[mode], "loss_size": loss_size}


def all_cases(args) -> list:
    """"<mode>/<loss size>" of every row, in table order."""
    modes = list(args.modes) + [f"objects@{x:g}" for x in args.decode_pixels]
    return [f"{mode}/{loss}" for loss in args.loss_sizes for mode in modes]


def own_loader(cfg, info, task, cache, data, decode_pixels=None):
    """The run's training set in steps cut every N objects (ObjectBatchSampler without costs), or
    by cost with another decode_pixels than the sampler's."""
    train_ds = task.datasets(data, cache)[0]
    costs = None if decode_pixels is None else [object_cost(size, cfg.image_size, cfg.loss_size, decode_pixels)
                                                 for size in train_ds.image_sizes()]
    sampler = ObjectBatchSampler(train_ds.object_counts(), cfg.objects_per_step, cfg.accumulate,
                                 num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
                                 costs=costs, piece_cost=0 if costs is None else piece_cost())
    return torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=0), sampler


def config(args, cache_dir: str, **flags) -> TrainConfig:
    return TrainConfig(checkpoint="none", model_type="vit_t", image_size=args.image_size, train_dir=str(DATA),
                       num_workers=0, seed=args.seed, cache_dir=cache_dir,
                       **flags)


def timed_epoch(loader, sampler, epoch, model, sam, optimizer, task, cache):
    """One epoch on this rank; per step: compute, wait, transfer (s), objects, images, compute CPU time (s),
    items, mask pixels."""
    sampler.set_epoch(epoch)
    items_of_steps = list(loader)  # the mask files are read here, before the clock starts
    params = [p for p in sam.parameters() if p.requires_grad]
    device = torch.device("cpu")
    steps = []
    set_train_mode(sam)
    for items in items_of_steps:
        t0, c0 = time.perf_counter(), time.process_time()
        batch = prepare_batch(items, sam, device)
        t1, c1 = time.perf_counter(), time.process_time()
        count = global_count(batch.image_index.numel(), device)  # waits for the other rank
        t2, c2 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        terms, _ = task.train_step(model, sam, batch, items, cache, None, epoch, 0)
        step_loss(terms, device, count).backward()
        t3, c3 = time.perf_counter(), time.process_time()
        dist.all_reduce(torch.zeros(1))  # waits for the other rank
        t4 = time.perf_counter()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= WORLD
        t5, c5 = time.perf_counter(), time.process_time()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()
        t6, c6 = time.perf_counter(), time.process_time()
        steps.append(((t1 - t0) + (t3 - t2) + (t6 - t5), (t2 - t1) + (t4 - t3), t5 - t4,
                      int(batch.image_index.numel()), batch.num_images, (c1 - c0) + (c3 - c2) + (c6 - c5),
                      len(items), sum(int(it["masks"].numel()) for it in items)))
    return steps


def worker(rank: int, args, port: int, out: str) -> None:
    torch.set_num_threads(1)
    if args.malloc == "keep":
        keep_freed_memory()  # as run.py's workers do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    info = DistInfo(rank=rank, local_rank=rank, world_size=WORLD)
    cache_dir = tempfile.mkdtemp(prefix=f"balance{rank}.")
    base_cfg = config(args, cache_dir)
    records = load_records(str(DATA))  # all 12 train; the cache is warmed through a validation set of them all
    data = RunData(train=records, val=records, notes=[])
    counts = [r.num_objects for r in data.train]
    per_step = args.objects_per_step or math.ceil(sum(counts) / len(counts))
    torch.manual_seed(args.seed)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=args.image_size)
    spec = base_cfg.resolve()
    configure(sam, spec.plan)
    cache = open_cache(spec.cache, sam, None, log=False)
    # Warm the cache: every image encoded and stored once.
    warm_task = build_task(base_cfg, spec, data)
    for item in warm_task.datasets(data, cache)[1]:
        if item["first_chunk"] and item.get("embedding") is None:
            batch_embeddings(sam, prepare_batch([item], sam, info.device), cache, None)
    runs = {}
    cases = all_cases(args)
    for mode in cases:
        cfg = config(args, cache_dir, **mode_flags(mode, per_step))
        task = build_task(cfg, cfg.resolve(), data)
        loader, _, sampler = make_loaders(cfg, info, data, task, cache)
        if mode.startswith("counts/"):
            loader, sampler = own_loader(cfg, info, task, cache, data)
        elif mode.startswith("objects@"):
            loader, sampler = own_loader(cfg, info, task, cache, data, float(mode.split("/")[0][8:]))
        own = copy.deepcopy(sam)
        optimizer = torch.optim.AdamW([p for p in own.parameters() if p.requires_grad], lr=cfg.lr)
        runs[mode] = (loader, sampler, task.step_module(own, info.device, WORLD), own, optimizer, task.loop)
    results = {mode: [] for mode in cases}
    for round_ in range(args.rounds + 1):  # round 0: warm-up
        for mode in cases:
            loader, sampler, model, own, optimizer, loop = runs[mode]
            steps = timed_epoch(loader, sampler, round_, model, own, optimizer, loop, cache)
            if round_:
                results[mode].append(steps)
    gathered = all_gather_objects(results)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": gathered, "per_step": per_step, "counts": counts}))
    dist.destroy_process_group()


def summarise(ranks, mode):
    """Totals over the counted epochs: step, compute, faster rank's wait, transfer (s), objects and images."""
    total = dict(step=0.0, compute=0.0, wait=0.0, transfer=0.0, objects=0, images=0, steps=0, spread=[],
                 cpu_slow=0.0, cpu_gap=0.0)
    for epoch in range(len(ranks[0][mode])):
        for per_rank in zip(*(r[mode][epoch] for r in ranks)):
            compute = [s[0] for s in per_rank]
            wait = [s[1] for s in per_rank]
            total["step"] += max(s[0] + s[1] + s[2] for s in per_rank)
            total["compute"] += sum(compute) / len(compute)
            total["wait"] += max(wait)
            total["transfer"] += max(s[2] for s in per_rank)
            total["objects"] += sum(s[3] for s in per_rank)
            total["images"] += sum(s[4] for s in per_rank)
            total["spread"] += [s[3] for s in per_rank]
            cpu = [s[5] for s in per_rank]
            total["cpu_slow"] += max(cpu)
            total["cpu_gap"] += max(cpu) - min(cpu)
            total["steps"] += 1
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--objects_per_step", type=int, default=0, help="default: mean objects per image, rounded up")
    parser.add_argument("--loss_sizes", nargs="+", default=["original", "low_res"], choices=["original", "low_res"],
                        help="--loss_size of the runs: every mode runs with each")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per mode (after one warm-up epoch)")
    parser.add_argument("--modes", nargs="+", default=["images", "capped", "counts", "objects"],
                        choices=["images", "capped", "counts", "objects"])
    parser.add_argument("--decode_pixels", nargs="*", type=float, default=[],
                        help="also rows cut by cost with these values of the cost model's decode_pixels "
                             "(samplers.DECODE_PIXELS: one decoding's worth in loss pixels over image_size^2)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed memory, as run.py's workers (utils/process.keep_freed_memory); "
                             "default: glibc's own settings")
    parser.add_argument("--json", help="also write every step's timings per rank to this file")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} is absent (the shared datasets live in ../shared/data beside the repository)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(worker, args=(args, port, str(out)), nprocs=WORLD, join=True)
        result = json.loads(out.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    ranks, per_step = result["ranks"], result["per_step"]
    print(f"command: python bench/balance.py {shlex.join(sys.argv[1:])}".rstrip())
    print(machine_line(1) + f" per process, {WORLD} gloo processes; 1-minute load average {load_before:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after")
    print(f"data: {DATA.name}, {len(result['counts'])} images, {sum(result['counts'])} objects "
          f"({min(result['counts'])}-{max(result['counts'])} per image); vit_t at {args.image_size} px, warm "
          f"embedding cache, mask decoder trains; {args.rounds} timed epochs per row")
    print()
    print("| mode | flags | steps/epoch | objects per rank per step | step ms | compute ms | faster rank waits ms "
          "| wait % of step | all-reduce ms | images/s | objects/s | CPU gap % | images/s from CPU time |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in all_cases(args):
        t = summarise(ranks, mode)
        flags = " ".join(f"--{k} {v}" for k, v in mode_flags(mode, per_step).items())
        flags += ("` (cut by count)" if mode.startswith("counts/") else
                  f"` (decode_pixels {mode.split('/')[0][8:]})" if mode.startswith("objects@") else "`")
        n, spread = t["steps"], t["spread"]
        print(f"| {mode} | `{flags} | {n // args.rounds} | {sum(spread) / len(spread):.1f} ({min(spread)}-{max(spread)}) "
              f"| {1e3 * t['step'] / n:.1f} | {1e3 * t['compute'] / n:.1f} | {1e3 * t['wait'] / n:.1f} "
              f"| {100 * t['wait'] / t['step']:.1f} | {1e3 * t['transfer'] / n:.2f} | {t['images'] / t['step']:.2f} "
              f"| {t['objects'] / t['step']:.1f} | {100 * t['cpu_gap'] / t['cpu_slow']:.1f} "
              f"| {t['images'] / (t['cpu_slow'] + t['transfer']):.2f} |")


if __name__ == "__main__":
    main()
