"""What one object and one image piece cost in a training step from cached embeddings, by image
size and --loss_size: the numbers behind ObjectBatchSampler's cost model (--objects_per_step).

    python bench/object_cost.py                        # vit_t at 256, both loss sizes, 5 rounds
    python bench/object_cost.py --image_size 512 --rounds 3

One process, one thread, vit_t with random weights, the mask decoder trains. Each case is one
micro-batch from cached embeddings (random ones: the decoder's work does not depend on their
values) through the run's own step (prepare_batch, PromptLoop.train_step, step_loss, backward):
P pieces (images) of O objects each, the images H x W. Box prompts on rectangular masks. Timed in
CPU time (process_time) of this process, so other jobs on a shared machine add little; the cases
take turns within every round (interleaved), and the table gives each case's median over the rounds
after a warm-up round.

A second table splits the CPU time of one piece of n objects of the largest image, loss at the
original size, into user and system time (getrusage) with the minor page faults: the system time
of the kernel handing out fresh zeroed memory for large objects x H x W tensors, which grows
faster than the objects.

The last lines fit, per loss size, the step's CPU time as
    a x objects + b x objects x loss pixels + c x pieces
by least squares (loss pixels: each object's pixels where its loss is computed: H x W with
--loss_size original, its crop of the low-resolution grid with low_res), and print the model that
samplers.object_cost implements next to it: the pixels one object's decoding is worth (a / b) and
the objects one piece is worth (c / a).
"""

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _machine import machine_line  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.training.config import TrainConfig  # noqa: E402
from segment_anything.utils.data.samplers import loss_pixels, object_cost, piece_cost  # noqa: E402
from segment_anything.utils.trainable import configure, set_train_mode  # noqa: E402
from segment_anything.utils.trainer import PromptLoop, SamTrainStep, prepare_batch, step_loss  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

SIZES = [(128, 128), (256, 256), (360, 360), (520, 696)]  # the nuclei set's image sizes and a smaller one
CASES = [(1, 8), (1, 32), (4, 8)]  # (pieces, objects per piece)
PIECE_SIZES = (8, 16, 24, 32)  # objects of one piece of the largest image, for the user / system split


class _NoCache:
    """What the step asks of an embedding cache when every item carries its embedding."""

    def round_trip(self, tensor):
        return tensor

    def store(self, key, tensor):
        return False


def items_for(pieces: int, objects: int, size, image_size: int, channels: int, rng: np.random.Generator):
    h, w = size
    grid = image_size // 16
    out = []
    for p in range(pieces):
        masks = np.zeros((objects, h, w), np.uint8)
        boxes = np.zeros((objects, 4), np.float32)
        for o in range(objects):
            y0, x0 = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
            y1, x1 = y0 + int(rng.integers(8, 20)), x0 + int(rng.integers(8, 20))
            masks[o, y0:y1, x0:x1] = 1
            boxes[o] = (x0, y0, x1, y1)
        out.append({"embedding": torch.randn(channels, grid, grid), "cache_key": f"k{p}", "original_size": size,
                    "input_size": ResizeLongestSide.get_preprocess_shape(h, w, image_size),
                    "masks": torch.from_numpy(masks), "boxes": torch.from_numpy(boxes),
                    "points": torch.zeros(objects, 0, 2), "point_labels": torch.zeros(objects, 0), "path": f"p{p}",
                    "index": p, "prompt": "box", "objects": torch.arange(objects), "first_chunk": True})
    return out


def step_usage(items, sam, model, loop, optimizer):
    """(user s, system s, minor page faults) of one step."""
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    step_cpu(items, sam, model, loop, optimizer)
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    return u1.ru_utime - u0.ru_utime, u1.ru_stime - u0.ru_stime, u1.ru_minflt - u0.ru_minflt


def step_cpu(items, sam, model, loop, optimizer) -> float:
    device = torch.device("cpu")
    c0 = time.process_time()
    batch = prepare_batch(items, sam, device)
    optimizer.zero_grad(set_to_none=True)
    terms, _ = loop.train_step(model, sam, batch, items, _NoCache(), None, 0, 0)
    step_loss(terms, device).backward()
    optimizer.step()
    return time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--loss_sizes", nargs="+", default=["original", "low_res"], choices=["original", "low_res"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=args.image_size)
    specs = {loss: TrainConfig(checkpoint="none", model_type="vit_t", image_size=args.image_size, train_dir=".",
                               loss_size=loss).resolve() for loss in args.loss_sizes}
    configure(sam, specs[args.loss_sizes[0]].plan)
    model = SamTrainStep(sam)
    set_train_mode(sam)
    optimizer = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-5)
    channels = sam.prompt_encoder.embed_dim
    rng = np.random.default_rng(0)
    cases = [(loss, size, pieces, objects) for loss in args.loss_sizes for size in SIZES for pieces, objects in CASES]
    items = {case: items_for(case[2], case[3], case[1], args.image_size, channels, rng) for case in cases}
    loops = {loss: PromptLoop(spec.loss) for loss, spec in specs.items()}  # the run's loss at each size
    times = {case: [] for case in cases}
    split = {n: [] for n in PIECE_SIZES}
    split_items = {n: items_for(1, n, SIZES[-1], args.image_size, channels, rng) for n in PIECE_SIZES}
    split_loop = PromptLoop(TrainConfig(checkpoint="none", model_type="vit_t", image_size=args.image_size,
                                        train_dir=".", loss_size="original").resolve().loss)
    load_before = os.getloadavg()[0]
    for round_ in range(args.rounds + 1):
        for case in cases:
            t = step_cpu(items[case], sam, model, loops[case[0]], optimizer)
            if round_:
                times[case].append(t)
        for n in PIECE_SIZES:
            usage = step_usage(split_items[n], sam, model, split_loop, optimizer)
            if round_:
                split[n].append(usage)
    print(f"command: python bench/object_cost.py {' '.join(sys.argv[1:])}".rstrip())
    print(machine_line(1) + f"; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"vit_t at {args.image_size} px, random weights, mask decoder trains from cached embeddings; CPU time, "
          f"median of {args.rounds} rounds")
    print()
    print("| loss size | image H x W | pieces x objects | loss pixels per object | step CPU ms | ms per object "
          "| model cost per object | model cost of the step |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for case in cases:
        loss, size, pieces, objects = case
        ms = 1e3 * statistics.median(times[case])
        cost = object_cost(size, args.image_size, loss)
        print(f"| {loss} | {size[0]} x {size[1]} | {pieces} x {objects} | {loss_pixels(size, args.image_size, loss)} "
              f"| {ms:.1f} | {ms / (pieces * objects):.2f} | {cost} | {pieces * (objects * cost + piece_cost())} |")
    print()
    h, w = SIZES[-1]
    print(f"| one piece of the {h} x {w} image, loss at the original size | user ms per object "
          "| system ms per object | minor page faults per object |")
    print("|---|---:|---:|---:|")
    for n in PIECE_SIZES:
        user, system, faults = (statistics.median(u[k] for u in split[n]) for k in range(3))
        print(f"| {n} objects | {1e3 * user / n:.2f} | {1e3 * system / n:.2f} | {faults / n:.0f} |")
    print()
    for loss in args.loss_sizes:
        rows = [c for c in cases if c[0] == loss]
        x = np.array([[p * o, p * o * loss_pixels(s, args.image_size, loss), p] for _, s, p, o in rows], float)
        y = np.array([1e3 * statistics.median(times[c]) for c in rows])
        (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
        print(f"fit, --loss_size {loss}: {a:.3f} ms per object + {1e3 * b:.4f} ms per 1000 loss pixels of each object "
              f"+ {c:.3f} ms per piece: one object's decoding is worth {a / b:,.0f} loss pixels, one piece "
              f"{c / a:.2f} objects")


if __name__ == "__main__":
    main()
