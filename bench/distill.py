"""Does --distill keep the base model's answers to other prompts, at what cost to the trained task?

    python bench/distill.py                                   # nails, vit_t at 256, 4 epochs
    python bench/distill.py --data ../shared/data/nuclei-objects --epochs 3 --distill 1 --l2sp 0.1
    python -m segment_anything.tools.synthetic_data demo_data && python bench/distill.py --data demo_data --lr 1e-3 --epochs 8

Trains the same run (vit_t, --checkpoint none: seeded RANDOM weights, so the numbers show the
mechanism, not the quality of a real fine-tune) without a keep-base term, with --distill W and
with --l2sp W, each through run.py. Then, for each run's best.pth, on the run's validation images
(the seeded split: never trained on):
  - distance: the mean squared difference of the tuned and the starting model's low-resolution
    logits (inside the image) on a fixed set of off-target prompts, --prompts per image (random
    boxes and single points, drawn with their own seed, not the training run's), per image, then
    averaged over the images;
  - val IoU: the mean IoU of the box-prompted validation objects at their original size (what the
    runs report as val_iou).
One table with the commands and the machine line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import machine_line  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.training.config import TrainConfig  # noqa: E402
from segment_anything.utils.data import MaskDataset, collate, prepare_data  # noqa: E402
from segment_anything.utils.distill import Anchor, decode_off_target, off_target_distance  # noqa: E402
from segment_anything.utils.losses import LossSpec, parse_loss  # noqa: E402
from segment_anything.utils.save_weight import load_partial_weight  # noqa: E402
from segment_anything.utils.trainer import evaluate, prepare_batch  # noqa: E402

MEASURE_SEED = 12345  # the off-target prompts of the measurement: another stream than any training run's


def train(args, out: Path, extra: list) -> list:
    cmd = [sys.executable, "run.py", "--model_type", "vit_t", "--checkpoint", "none", "--image_size", str(args.image_size),
           "--train_dir", str(args.data), "--epoch", str(args.epochs), "--batch_size", str(args.batch_size),
           "--seed", str(args.seed), "--lr", str(args.lr), "--dist", "no", "--num_workers", "0", "--cache_dir", str(args.work / "cache"),
           "--output_dir", str(out), *extra]
    if not (out / "best.pth").is_file():
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return cmd


def starting_model(args):
    """The model fit() starts from: it seeds torch with --seed, then builds it."""
    torch.manual_seed(args.seed)
    return sam_model_registry["vit_t"](checkpoint=None, image_size=args.image_size).eval()


@torch.no_grad()
def measure(args, base, run: Path, val) -> dict:
    tuned = starting_model(args)
    load_partial_weight(tuned, run / "best.pth")
    tuned.eval()
    anchor = Anchor(LossSpec(parse_loss("bce=1"), distill=1.0, distill_prompts=args.prompts))
    anchor.capture(base)
    ds = MaskDataset(val, args.image_size, max_objects=16, seed=MEASURE_SEED, train=False, off_target=args.prompts)
    distances = []
    for k in range(len(ds)):
        item = ds[k]
        if not item["first_chunk"]:
            continue
        batch = prepare_batch([item], tuned, torch.device("cpu"))
        embedding = base.image_encoder(batch.images)  # the encoder is frozen in these runs: one embedding for both
        off = batch.off_target
        a = decode_off_target(tuned.prompt_encoder, tuned.mask_decoder, embedding, off)
        b = decode_off_target(anchor.prompt_encoder, anchor.mask_decoder, embedding, off)
        distances.append(off_target_distance(a, b, off.index, batch.input_sizes, args.image_size)[0].item())
    loader = torch.utils.data.DataLoader(MaskDataset(val, args.image_size, max_objects=16, seed=args.seed, train=False),
                                         batch_size=1, collate_fn=collate)
    iou = evaluate(tuned, loader, torch.device("cpu"), None)["iou"]
    return {"distance": sum(distances) / len(distances), "val_iou": iou, "images": len(distances)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "nails")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--lr", type=float, default=2e-4, help="run.py's --lr (2e-4 is its default)")
    parser.add_argument("--distill", type=float, default=1.0, help="--distill weight of the second run")
    parser.add_argument("--l2sp", type=float, default=0.1, help="--l2sp weight of the third run (0: no such run)")
    parser.add_argument("--prompts", type=int, default=8, help="off-target prompts per validation image")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam_bench_distill",
                        help="run folders (reused when they hold a best.pth) and the embedding cache")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: --data {args.data} is not a folder")
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [("none", []), (f"--distill {args.distill:g}", ["--distill", str(args.distill)])]
    if args.l2sp > 0:
        runs.append((f"--l2sp {args.l2sp:g}", ["--l2sp", str(args.l2sp)]))
    val = prepare_data(TrainConfig(train_dir=str(args.data), checkpoint="none", image_size=args.image_size,
                                   seed=args.seed).resolve().data).val
    base = starting_model(args)
    rows, commands = [], []
    for name, extra in runs:
        tag = name.replace("--", "").replace(" ", "_")
        commands.append(" ".join(map(str, train(args, args.work / tag, extra))))
        rows.append((name, measure(args, base, args.work / tag, val)))
    ref = rows[0][1]
    print(f"keep-base terms: vit_t RANDOM weights (--checkpoint none, seed {args.seed}) at {args.image_size} px, "
          f"{args.epochs} epochs, --lr {args.lr:g}, {args.data.name}: {rows[0][1]['images']} validation images x {args.prompts} "
          f"off-target prompts (seed {MEASURE_SEED})")
    print(machine_line(threads))
    print("| term | off-target distance to base (MSE of logits) | vs none | val IoU (best.pth) | IoU vs none |")
    print("|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['distance']:.4g} | {m['distance'] / ref['distance']:.2f}x | {m['val_iou']:.4f} | "
              f"{m['val_iou'] - ref['val_iou']:+.4f} |")
    print("commands:")
    for c in commands:
        print("  " + c)
    print(json.dumps({name: m for name, m in rows}))


if __name__ == "__main__":
    main()
