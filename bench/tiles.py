"""Tiled training on a large image: peak memory and time of a training step untiled vs --tile, and
how many objects are too small for the encoder in each mode.

The large image is a mosaic (6000x4000 by default; --sizes gives several) of the nuclei-instances images in ../shared/data (objects
known: their label maps are pasted alongside, one label per nucleus), written once as an
instance_map data set in a temporary folder. Each mode runs in a fresh subprocess (its peak
resident set size, ru_maxrss, is its own) and trains the mask decoder for --steps steps of batch 1
through the run's own pieces (records, tiling, MaskDataset, PromptLoop, AdamW) without the
embedding cache: untiled, an item is the whole mosaic resized to the encoder's side; tiled, an item
is one tile. The lowest step time counts (data loading timed apart). Random weights: memory and
time only. An object is "too small" when the longer side of its box (its visible part's, tiled) is
below 8 pixels of the encoder's input.

    python bench/tiles.py                                   # vit_t, 6000x4000, tile 1024, 2 steps
    python bench/tiles.py --sizes 6000x4000,3000x2000 --steps 1
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._machine import machine_line  # noqa: E402

NUCLEI = REPO.parent / "shared" / "data" / "nuclei-instances"
SMALL = 8  # encoder pixels


def build_mosaic(root: Path, height: int, width: int) -> Path:
    """root/image/mosaic.png (RGB) and root/mask/mosaic.png (16-bit labels): the nuclei images
    pasted row by row, in name order, cycling until the next one no longer fits; written once."""
    image_path, mask_path = root / "image" / "mosaic.png", root / "mask" / "mosaic.png"
    if image_path.exists() and mask_path.exists():
        return root
    names = sorted(p.name for p in (NUCLEI / "image").glob("*.png"))
    if not names:
        sys.exit(f"error: no images in {NUCLEI / 'image'} (the shared data sets are missing)")
    image = np.zeros((height, width, 3), np.uint8)
    labels = np.zeros((height, width), np.uint16)
    x = y = row = count = 0
    for k in range(10_000):
        name = names[k % len(names)]
        tile = cv2.imread(str(NUCLEI / "image" / name), cv2.IMREAD_COLOR)
        lab = cv2.imread(str(NUCLEI / "mask" / name), cv2.IMREAD_UNCHANGED).astype(np.int64)
        h, w = lab.shape
        if x + w > width:
            x, y, row = 0, y + row, 0
        if y + h > height:
            break
        image[y:y + h, x:x + w] = tile[..., ::-1]
        values = np.unique(lab[lab > 0])
        relabel = np.zeros(int(lab.max()) + 1, np.int64)
        relabel[values] = np.arange(count + 1, count + 1 + len(values))
        labels[y:y + h, x:x + w] = relabel[lab]
        count += len(values)
        x, row = x + w, max(row, h)
    for path, array in ((image_path, image[..., ::-1]), (mask_path, labels)):
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), array)
    return root


def records(root: Path, tile: int, overlap: int, min_visible: float):
    from segment_anything.utils.data import load_records
    from segment_anything.utils.data.tiling import tile_records

    found = load_records(str(root), "instance_map")
    return tile_records(found, tile, overlap, min_visible) if tile else (found, None)


def too_small(root: Path, tile: int, overlap: int, min_visible: float, image_size: int) -> dict:
    """Objects trained, and those whose box is below SMALL encoder pixels, in one mode."""
    from segment_anything.utils.data.tiling import measure

    recs, counts = records(root, tile, overlap, min_visible)
    sides = []
    for r in recs:  # the label map read once per item; a tile's boxes are those of its objects' visible parts
        area, _, boxes = measure(r, [(0, 0, r.size[1], r.size[0])])
        sides += list(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[area > 0] * image_size / max(r.size))
    sides = np.array(sides)
    out = {"items": len(recs), "objects": len(sides), "small": int((sides < SMALL).sum()),
           "median_side": float(np.median(sides))}
    if counts is not None:
        out["untrained"] = counts.untrained
    return out


def one_case(args) -> dict:
    import torch

    from segment_anything import sam_model_registry
    from segment_anything.utils.data import MaskDataset
    from segment_anything.utils.data.prompts import PromptConfig
    from segment_anything.utils.random_weights import randomize_
    from segment_anything.utils.trainable import set_train_mode
    from segment_anything.utils.trainer import PromptLoop, SamTrainStep, step_loss

    torch.set_num_threads(args.threads)
    tile = args.tile if args.case == "tiled" else 0
    recs, _ = records(Path(args.work), tile, args.tile_overlap, args.tile_min_visible)
    ds = MaskDataset(recs, args.image_size, PromptConfig(), args.max_objects, seed=0, train=True)
    sam = randomize_(sam_model_registry[args.model_type](image_size=args.image_size), seed=0)
    sam.requires_grad_(False)
    sam.mask_decoder.requires_grad_(True)
    set_train_mode(sam)
    model, loop, cpu = SamTrainStep(sam), PromptLoop(), torch.device("cpu")
    optimizer = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-5)
    data_s, step_s, objects = [], [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        items = [ds[(i % len(ds), 0)]]
        t1 = time.perf_counter()
        batch = loop.prepare(items, sam, cpu)
        terms, _ = loop.train_step(model, sam, batch, items, None, None, 0, i)
        step_loss(terms, cpu).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        data_s.append(t1 - t0)
        step_s.append(t2 - t1)
        objects.append(len(items[0]["masks"]))
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "data_s": min(data_s),
            "step_s": min(step_s), "item": list(items[0]["original_size"]), "objects": objects}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_type", default="vit_t")
    p.add_argument("--image_size", type=int, default=1024)
    p.add_argument("--sizes", default="6000x4000", help="mosaic sizes WxH, comma-separated (memory against image size)")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--tile_overlap", type=int, default=128)
    p.add_argument("--tile_min_visible", type=float, default=0.5)
    p.add_argument("--max_objects", type=int, default=4, help="objects per training item (--max_objects)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sam_bench_tiles"), help="mosaic folder")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(one_case(args)))
        return
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    rows = {}
    for width, height in sizes:
        root = build_mosaic(Path(args.work) / f"{width}x{height}", height, width)
        for case in ("untiled", "tiled"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--work", str(root), "--case", case]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"error: the {case} case failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(too_small(root, args.tile if case == "tiled" else 0, args.tile_overlap, args.tile_min_visible,
                                 args.image_size))
            rows[(f"{width}x{height}", case)] = row
    print(f"command: python bench/tiles.py {' '.join(sys.argv[1:])}")
    print(machine_line(args.threads))
    print(f"{args.model_type} at {args.image_size} px, random weights, mask decoder trains, no embedding cache; "
          f"mosaics of the nuclei-instances images; tile {args.tile} overlap {args.tile_overlap}, min visible "
          f"{args.tile_min_visible:g}; batch 1, at most {args.max_objects} objects per item, {args.steps} step(s), "
          f"lowest time; too small: box's longer side < {SMALL} encoder pixels")
    print("| image | mode | items | item size | peak RSS (MiB) | data (s) | step (s) | objects | too small | "
          "median box side (encoder px) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (size, case), r in rows.items():
        objects = f"{r['objects']}" + (f" ({r['untrained']} never trained)" if "untrained" in r else "")
        print(f"| {size} | {case} | {r['items']} | {r['item'][1]}x{r['item'][0]} | {r['peak_mb']:.0f} | "
              f"{r['data_s']:.2f} | {r['step_s']:.2f} | {objects} | {r['small']} "
              f"({100 * r['small'] / max(1, r['objects']):.1f} %) | {r['median_side']:.1f} |")

if __name__ == "__main__":
    main()
