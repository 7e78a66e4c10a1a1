"""Peak memory of a training step and of validation on one image with many objects.

    python bench/objects.py                          # 16, 100, 300 objects with --max_objects 16
    python bench/objects.py --counts 16 300 --image_side 512 --image_size 512 --skip_unbounded

One image (image_side x image_side) holds N disc-shaped objects on a grid; its masks are drawn on
demand, only those asked for, as a format reading per-object files does. Training takes at most
--max_objects of them per step; validation decodes every object in chunks of --max_objects (one
encoder pass). A last row shows the largest count with --max_objects equal to it, i.e. no bound.

Each case runs in a fresh subprocess. On CPU the figure is the peak resident set size during the
measured phase minus the resident size just before it (the kernel's peak counter, VmHWM, is reset
through /proc/self/clear_refs first). The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536, so
glibc serves every block over 64 KiB (all tensors that matter) from mmap and returns it to the
system when freed: the resident size then follows live memory instead of keeping freed heap that
the measured phase could reuse unseen. The training step measured is the second one, after a
warm-up step that also creates the optimizer state. On CUDA the figure is
torch.cuda.max_memory_allocated minus the allocation before the phase.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.utils.data import collate  # noqa: E402
from segment_anything.utils.data.dataset import MaskDataset  # noqa: E402
from segment_anything.utils.data.records import Record  # noqa: E402
from segment_anything.utils.trainable import TrainPlan, configure, set_train_mode  # noqa: E402
from segment_anything.utils.batch import prepare_batch  # noqa: E402
from segment_anything.utils.trainer import SamTrainStep, evaluate, score, step_loss  # noqa: E402


@dataclass(frozen=True)
class GridRecord(Record):
    """n discs on a square grid; masks drawn only for the indices asked for."""

    n: int = 1

    def _disc(self, k: int):
        cols = int(np.ceil(np.sqrt(self.n)))
        cell = self.size[0] // cols
        r, c = divmod(k, cols)
        return (c * cell + cell // 2, r * cell + cell // 2), max(cell // 3, 2)

    def load_image(self) -> np.ndarray:
        image = np.random.default_rng(0).integers(0, 90, (*self.size, 3), dtype=np.uint8)
        for k in range(self.n):
            center, radius = self._disc(k)
            cv2.circle(image, center, radius, (210, 130, 60), -1)
        return image

    def load_masks(self, indices=None) -> np.ndarray:
        indices = range(self.n) if indices is None else indices
        out = np.zeros((len(indices), *self.size), np.uint8)
        for j, k in enumerate(indices):
            cv2.circle(out[j], *self._disc(k), 1, -1)
        return out


class Peak:
    """Peak memory of a phase, in bytes above the level at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Peak":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = _status_kb("VmHWM") * 1024 - self.start


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_case(args) -> dict:
    """In the subprocess: one image with args.case objects; returns the two peaks in bytes."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=args.image_size).to(device)
    configure(sam, TrainPlan())
    step = SamTrainStep(sam)
    optimizer = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-4)
    record = GridRecord(image="grid.png", size=(args.image_side, args.image_side), source="grid",
                        categories=("object",) * args.case, n=args.case)
    train = MaskDataset([record], args.image_size, max_objects=args.max_objects, seed=0, train=True)
    val = MaskDataset([record], args.image_size, max_objects=args.max_objects, train=False)

    def train_step(epoch: int) -> int:
        set_train_mode(sam)
        batch = prepare_batch([train[(0, epoch)]], sam, device)
        low_res, iou_pred = step(batch.images, *batch.prompts())
        terms = score(sam, batch, low_res, iou_pred)
        optimizer.zero_grad(set_to_none=True)
        step_loss(terms, device).backward()
        optimizer.step()
        return int(terms["loss"].numel())

    train_step(0)  # warm-up: first-call allocations and AdamW's state
    with Peak(device) as train_peak:
        prompts = train_step(1)
    loader = torch.utils.data.DataLoader(val, batch_size=1, collate_fn=collate)
    with Peak(device) as val_peak:
        metrics = evaluate(sam, loader, device, None)
    return {"train": train_peak.bytes, "val": val_peak.bytes, "train_prompts": prompts,
            "val_prompts": metrics["prompts"], "chunks": len(val)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[16, 100, 300])
    parser.add_argument("--max_objects", type=int, default=16)
    parser.add_argument("--image_side", type=int, default=256, help="the image is image_side x image_side pixels")
    parser.add_argument("--image_size", type=int, default=256, help="encoder input side (vit_t, random weights)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip_unbounded", action="store_true", help="leave out the last row (it needs about "
                        "2 GB at 256 px and grows with the image area)")
    parser.add_argument("--save", action="store_true", help="also write the table to bench/out/objects.md")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args)))
        return

    cases = [(n, args.max_objects) for n in args.counts]
    if not args.skip_unbounded:
        cases.append((max(args.counts), max(args.counts)))
    results = []
    for n, bound in cases:
        cmd = [sys.executable, __file__, "--case", str(n), "--max_objects", str(bound), "--image_side",
               str(args.image_side), "--image_size", str(args.image_size), "--threads", str(args.threads),
               "--device", args.device]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results.append((n, bound, json.loads(out.strip().splitlines()[-1])))

    measure = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM) above the RSS at the start of the phase"
    lines = [
        f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]),
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, {args.device}, torch {torch.__version__}",
        f"model: vit_t (random weights) at {args.image_size} px; one {args.image_side}x{args.image_side} image; "
        f"memory: {measure}, one fresh process per row",
        "",
        "| objects | --max_objects | train prompts | train step MB | vs first row | val chunks | val prompts | validation MB | vs first row |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results[0][2]
    for n, bound, r in results:
        lines.append(f"| {n} | {bound} | {r['train_prompts']} | {r['train'] / 2**20:,.1f} | {r['train'] / base['train']:.2f}x "
                     f"| {r['chunks']} | {r['val_prompts']} | {r['val'] / 2**20:,.1f} | {r['val'] / base['val']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.save:
        out = ROOT / "bench" / "out" / "objects.md"
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
