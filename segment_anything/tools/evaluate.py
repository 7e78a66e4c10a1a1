"""Base vs fine-tuned SAM on exactly the same prompts: IoU, Dice, boundary IoU, corrective clicks,
the interactive-segmentation literature's NoC@85/90 and IoU-vs-clicks curves, IoU under box noise,
prompt following, automatic-mask AP (--amg), every metric by object size, and a forgetting check
on a second data set.

    python -m segment_anything.tools.evaluate --model_type vit_b --checkpoint sam_vit_b_01ec64.pth \
        --weights runs/<run>/best.pth --data_dir data/val [--prompt box|point|box+point] \
        [--clicks 1,3,5] [--reference_json coco/instances_val2017.json --reference_images coco/val2017] \
        --output_dir eval/

Writes per_object.csv (one row per object and model), summary.json (means with 95 % bootstrap
intervals over images, and the paired difference fine-tuned - base, overall and by object size),
compare.png (the objects that gained and lost most), clicks.png (mean IoU after 1..N clicks from
a point and from a box, both models), and prints the tables.
"""

import argparse
import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..predictor import SamPredictor
from ..tiled_predictor import TiledPredictor
from ..utils import draw
from ..utils.clicks import click_session
from ..utils.data import DataError, DataOptions, Record, split_records
from ..utils.data.checks import raise_problems, summary
from ..utils.data.formats import DATA_FLAGS, DATA_FORMATS
from ..utils.data.prepare import load_split
from ..utils.data.prompts import PROMPTS, PromptConfig, object_prompts
from ..utils.image_spec import add_arguments as add_image_arguments
from ..utils.tiles import add_arguments as add_tile_arguments, check_arguments as check_tile_arguments
from ..utils.data.records import mask_to_box
from ..utils.eval_metrics import BOX_NOISE, NOC_CAP, NOC_TARGETS, SIZES, automatic_mask_scores, size_bucket
from ..utils.metrics import boundary_iou, mask_dice, mask_iou
from ..utils.postprocess import clean_masks
from ..training.config import str2bool
from . import _protocols
from ._flags import add_data_options, add_data_set, alias
from ._cli import at_least, cli
from ._model import add_model_args, check_base, image_spec_as_trained, load_model, weights_metadata
from ._stats import bootstrap_mean, format_ci

MODELS = ("base", "tuned")
METRICS = ("iou", "dice", "boundary_iou")


@dataclass(frozen=True)
class Protocols:
    """Which literature protocols run: noc = click cap (0: none), box_noise = jitter percents,
    prompt_following = the background point and the box leakage."""

    noc: int = NOC_CAP
    box_noise: Tuple[int, ...] = tuple(round(f * 100) for f in BOX_NOISE)
    prompt_following: bool = True

    def metrics(self) -> List[str]:
        names = [f"noc{round(t * 100)}_{start}" for start in _protocols.STARTS for t in NOC_TARGETS] if self.noc else []
        names += [f"iou_box_noise{p}" for p in self.box_noise]
        if self.prompt_following:
            names += ["box_outside_fraction", "background_point_area", "background_point_fraction"]
        return names


def parse_percents(text: str) -> Tuple[int, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box_noise takes percents like 0,5,10,20 (or none), got {text!r}") from None
    if any(v < 0 or v > 100 for v in values):
        raise ValueError(f"--box_noise percents must be within 0..100, got {text!r}")
    return values


def parse_clicks(text: Optional[str]) -> List[int]:
    if not text:
        return []
    try:
        clicks = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise ValueError(f"--clicks takes click counts like 1,3,5, got {text!r}") from None
    if clicks[0] < 1:
        raise ValueError(f"--clicks counts must be >= 1, got {text!r}")
    return clicks


def read_data(args: argparse.Namespace, name: str, opts: DataOptions, split: str = "all") -> List[Record]:
    """Checked records of the data set --<name>_dir or --<name>_json + --<name>_images (a COCO
    JSON needs its image folder); ``split`` val/train reproduces run.py's seeded split of a
    training folder. With --skip_bad, bad samples are left out and counted."""
    path = getattr(args, f"{name}_json") or getattr(args, f"{name}_dir")
    images = getattr(args, f"{name}_images")
    if not path:
        raise ValueError(f"--{name}_dir (a folder or a COCO JSON) or --{name}_json + --{name}_images is required")
    if path.endswith(".json") or opts.data_format == "coco":
        if not images:
            raise ValueError(f"{path}: a COCO JSON needs the folder of its images (--{name}_images)")
        opts = dataclasses.replace(opts, data_format="coco")
    loaded = load_split(opts.data_format, path, opts, images)
    if not args.skip_bad:
        raise_problems(loaded.problems, loaded.source)
    elif loaded.problems:
        print(f"{loaded.source}: {summary(loaded.problems, loaded.total)}")
    if not loaded.records:
        raise DataError(f"{loaded.source}: no usable images ({loaded.total} listed)")
    records = loaded.records
    if split != "all":
        train, val = split_records(records, args.val_fraction, args.seed)
        records = val if split == "val" else train
    return records[: args.max_images] if args.max_images else records


def object_prompt_list(records: List[Record], cfg: PromptConfig, seed: int) -> List[dict]:
    """One prompt per object, seeded by (seed, image, object): both models see exactly these."""
    out = []
    for i, record in enumerate(records):
        for j, mask in enumerate(record.load_masks()):
            rng = np.random.default_rng([seed, i, j])
            box, points, labels = object_prompts(mask, cfg, rng)
            real = labels >= 0  # drop padding slots: the predictor pads by itself
            out.append({"image_index": i, "object": j, "box": box if cfg.uses_box else None,
                        "points": points[real] if real.any() else None, "labels": labels[real] if real.any() else None})
    return out


def score_model(sam, records: List[Record], prompts: List[dict], clicks: List[int], min_area: int,
                protocols: Protocols = Protocols(), seed: int = 0, tile: int = 0, tile_overlap: int = 128) -> List[dict]:
    """Metrics of one model for every prompt; masks kept as packed bits for the comparison picture.
    A metric of the image (the background point) sits in the image's first row, NaN in the others,
    so its mean and interval count each image once.
    tile: decode each prompt in the tile that holds it best (0: the whole image resized)."""
    predictor = TiledPredictor(sam, tile, tile_overlap) if tile else SamPredictor(sam)
    if tile:  # a click session would move between tiles, a jittered box may span two: whole images only
        protocols = Protocols(0, (), False)
    rows, by_image = [], {}
    for p in prompts:
        by_image.setdefault(p["image_index"], []).append(p)
    for i, image_prompts in sorted(by_image.items()):
        record = records[i]
        predictor.set_image(record.load_image())
        targets = record.load_masks([p["object"] for p in image_prompts]).astype(bool)
        first = len(rows)
        for p, target in zip(image_prompts, targets):
            rows.append(score_prompt(predictor, p, target, clicks, min_area, record))
            rows[-1].update(protocol_scores(predictor, p, target, protocols, np.random.default_rng([seed, i, p["object"]])))
        if protocols.prompt_following:
            image_values = _protocols.background_point(predictor, record.load_masks().astype(bool).any(0))
            for j, row in enumerate(rows[first:]):
                row.update({k: v if j == 0 else float("nan") for k, v in image_values.items()})
    return rows


def protocol_scores(predictor: SamPredictor, p: dict, target: np.ndarray, protocols: Protocols,
                    rng: np.random.Generator) -> dict:
    """The object's size class and the literature protocols, all on the object's own box
    (cv2.boundingRect of its mask) whatever --prompt says, so they compare across runs."""
    box = mask_to_box(target)
    row = {"area": int(target.sum()), "size": size_bucket(int(target.sum()))}
    if protocols.noc:
        curves = _protocols.click_curves(predictor, target, box, protocols.noc)
        row.update(_protocols.noc_entries(curves, protocols.noc), curves=curves)
    row.update(_protocols.box_noise_entries(predictor, target, box, list(protocols.box_noise), rng))
    if protocols.prompt_following:
        row["box_outside_fraction"] = _protocols.box_leakage(predictor, box)
    return row


def score_prompt(predictor: SamPredictor, p: dict, target: np.ndarray, clicks: List[int], min_area: int, record: Record) -> dict:
    # Tiled: the first prompt's tile for every click after it (the low-res logits fed back are that tile's).
    pin = {"tile": predictor.tile_for(p["points"], p["box"])} if isinstance(predictor, TiledPredictor) else {}

    def predict(points, labels, logits):
        masks, scores, low_res = predictor.predict(points, labels, p["box"], logits, multimask_output=False, **pin)
        return clean_masks(masks[0], min_area), low_res

    mask, low_res = predict(p["points"], p["labels"], None)
    pred_t, target_t = torch.from_numpy(mask[None]), torch.from_numpy(target[None])
    # A stack's plane is named with its file; the intervals resample files (a stack's planes are alike).
    row = {"image": record.name, "file": record.image, "object": p["object"], "category": record.categories[p["object"]],
           "iou": mask_iou(pred_t, target_t).item(), "dice": mask_dice(pred_t, target_t).item(),
           "boundary_iou": boundary_iou(pred_t, target_t).item(), "mask": np.packbits(mask)}
    if clicks:
        points = p["points"] if p["points"] is not None else np.zeros((0, 2), np.float32)
        labels = p["labels"] if p["labels"] is not None else np.zeros((0,), np.float32)
        session = click_session(predict, target, points, labels, mask, low_res, max(clicks))
        for k in clicks:
            row[f"iou_click{k}"] = mask_iou(torch.from_numpy(session[k - 1][None]), target_t).item()
    return row


def summarize(results: Dict[str, List[dict]], metrics: List[str], n_resamples: int, seed: int,
              by_size: bool = True) -> dict:
    """Means with intervals for both models and their paired difference; with by_size, the same
    for each COCO size class (small < 32², medium < 96², large) that holds objects."""
    groups = [r.get("file", r["image"]) for r in results["base"]]
    out = {"objects": len(groups), "images": len(set(groups))}
    if by_size and results["base"] and "size" in results["base"][0]:
        out["by_size"] = {}
        for size in SIZES:
            keep = [i for i, r in enumerate(results["base"]) if r["size"] == size]
            if keep:
                subset = {m: [results[m][i] for i in keep] for m in MODELS}
                out["by_size"][size] = summarize(subset, metrics, n_resamples, seed, by_size=False)
    for name in MODELS:
        out[name] = {m: bootstrap_mean([r[m] for r in results[name]], groups, n_resamples, seed) for m in metrics}
    out["difference"] = {
        m: bootstrap_mean([t[m] - b[m] for b, t in zip(results["base"], results["tuned"])], groups, n_resamples, seed)
        for m in metrics
    }
    return out


def table(summary: dict, metrics: List[str], title: str) -> str:
    """The summary as a Markdown table; each row names the images its intervals resample (a
    metric that does not apply to some objects rests on fewer)."""
    lines = [f"{title}: {summary['objects']} objects in {summary['images']} images, "
             "mean [95% bootstrap interval over images]", "",
             "| metric | images | base | fine-tuned | fine-tuned - base |", "|---|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m} | {summary['tuned'][m]['images']} | {format_ci(summary['base'][m])} | "
                     f"{format_ci(summary['tuned'][m])} | {format_ci(summary['difference'][m], signed=True)} |")
    if summary["images"] == 1:
        lines += ["", "warning: one image: the interval resamples images, so over one image there is no interval "
                      "(it would be a single point); evaluate more images to see how much the means can move"]
    return "\n".join(lines)


def write_csv(path: Path, results: Dict[str, Dict[str, List[dict]]], metrics: List[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "model", "image", "object", "category", "area", "size"] + metrics)
        for dataset, by_model in results.items():
            for model in MODELS:
                for r in by_model[model]:
                    writer.writerow([dataset, model, r["image"], r["object"], r["category"], r.get("area", ""),
                                     r.get("size", "")] + [f"{r[m]:.6f}" for m in metrics])


def clicks_figure(results: Dict[str, List[dict]], path: Path) -> None:
    """clicks.png: mean IoU after 1..N interactions, from a point and from a box, both models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for model, colour in zip(MODELS, ("tab:blue", "tab:red")):
        for start, style in zip(_protocols.STARTS, ("-", "--")):
            curves = np.array([r["curves"][start] for r in results[model]])
            ks = np.arange(1, curves.shape[1] + 1)
            ax.plot(ks, curves.mean(0), style, color=colour, marker="o", markersize=3,
                    label=f"{'fine-tuned' if model == 'tuned' else 'base'}, from a {start}")
    for t in NOC_TARGETS:
        ax.axhline(t, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("interactions (the first point or box, then corrective clicks)")
    ax.set_ylabel(f"mean IoU over {len(results['base'])} objects")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(np.arange(1, curves.shape[1] + 1, max(1, curves.shape[1] // 10)))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SIZE_NOTE = {"small": "area < 32²", "medium": "32² <= area < 96²", "large": "area >= 96²"}
COMPARE_CELL = 160  # pixels per picture in compare.png


def compare_rows(results: Dict[str, List[dict]], count: int) -> List[Tuple[int, str]]:
    """(object index, row label): the ``count`` objects with the largest IoU gain, then the
    ``count`` with the largest loss; each label says which it is ("gain +0.60: IoU 0.20 -> 0.80")."""
    base, tuned = [r["iou"] for r in results["base"]], [r["iou"] for r in results["tuned"]]
    gains = np.array(tuned) - np.array(base)
    order = np.argsort(-gains, kind="stable")
    chosen = list(order[:count]) + [i for i in order[::-1][:count] if i not in order[:count]]
    rows = []
    for i in chosen:
        kind = "gain" if gains[i] > 0 else "loss" if gains[i] < 0 else "same"
        rows.append((int(i), f"{kind} {gains[i]:+.2f}: IoU {base[i]:.2f} -> {tuned[i]:.2f}"))
    return rows


def compare_picture(records: List[Record], prompts: List[dict], results: Dict[str, List[dict]], count: int) -> np.ndarray:
    """Rows from compare_rows; columns: image with the prompt, ground truth, base, fine-tuned
    (cropped around the object). The prompt is drawn after the crop is scaled to its cell, with
    hollow point markers of a fixed size, so a point does not cover a small object."""
    rows, labels = [], []
    for i, label in compare_rows(results, count):
        p, record = prompts[i], records[prompts[i]["image_index"]]
        image = record.load_image()
        target = record.load_masks([p["object"]])[0].astype(bool)
        shape = target.shape
        masks = [np.unpackbits(results[m][i]["mask"])[: target.size].reshape(shape).astype(bool) for m in MODELS]
        y0, x0, y1, x1 = crop_around(target, p["box"])
        scale = min(COMPARE_CELL / (x1 - x0), COMPARE_CELL / (y1 - y0))
        box = None if p["box"] is None else (np.asarray(p["box"]) - [x0, y0, x0, y0]) * scale
        points = None if p["points"] is None else (np.asarray(p["points"]) - [x0, y0]) * scale
        prompted = draw.draw_prompt(draw.fit(image[y0:y1, x0:x1], COMPARE_CELL), box, points, p["labels"],
                                     radius=4, hollow=True)
        pictures = [draw.overlay(image, [m], [color])[y0:y1, x0:x1] for m, color in
                    zip([target, *masks], [draw.GREEN, draw.BLUE, draw.RED])]
        rows.append([prompted] + pictures)
        labels.append(label)
    return draw.grid(rows, ["image + prompt", "ground truth", "base", "fine-tuned"], labels, cell=COMPARE_CELL)


def crop_around(target: np.ndarray, box: Optional[np.ndarray], margin: float = 0.75):
    """(y0, x0, y1, x1): the object (and its prompt box) grown by ``margin`` of its size on each
    side, so small objects are visible; the predictions are shown inside this window."""
    ys, xs = np.nonzero(target)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    if box is not None:
        x0, y0, x1, y1 = min(x0, box[0]), min(y0, box[1]), max(x1, box[2]), max(y1, box[3])
    dy, dx = int((y1 - y0) * margin) + 8, int((x1 - x0) * margin) + 8
    h, w = target.shape
    return int(max(0, y0 - dy)), int(max(0, x0 - dx)), int(min(h, y1 + dy)), int(min(w, x1 + dx))


def main(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    clicks = parse_clicks(args.clicks)
    check_tile_arguments(args)
    at_least(args, noc=0, amg_points_per_side=1, min_region_area=0, compare_count=0)
    protocols = Protocols(args.noc, parse_percents(args.box_noise), args.prompt_following)
    if args.tile and protocols.metrics():  # score_model runs them on whole images only
        print("note: --tile: the literature protocols (--noc, --box_noise, --prompt_following) are off")
        protocols = Protocols(0, (), False)
    metrics = list(METRICS) + [f"iou_click{k}" for k in clicks] + protocols.metrics()
    cfg = PromptConfig(prompt=args.prompt, num_points=args.num_points)
    # Every input is read and checked before any model is built, the weights files first (quick).
    # Both models at the fine-tuned model's input size (a base at 1024 would not be the same model).
    meta = weights_metadata(args.weights)
    args.image_size = args.image_size or meta.get("image_size") or 1024
    check_base(args.checkpoint, args.model_type, args.image_size)
    image_spec_as_trained(args, args.weights)  # fills the image flags left out, as the run read its images
    options = DataOptions.from_flags(**{name: getattr(args, name) for name in DATA_FLAGS})
    datasets = {"data": read_data(args, "data", options, args.split)}
    if args.reference_dir or args.reference_json:  # read as it is: the options are --data_dir's
        datasets["reference"] = read_data(args, "reference", DataOptions(args.reference_format))
    prompts = {name: object_prompt_list(recs, cfg, args.prompt_seed) for name, recs in datasets.items()}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: Dict[str, Dict[str, List[dict]]] = {name: {} for name in datasets}
    automatic: Dict[str, dict] = {}
    for model_name, weights in (("base", None), ("tuned", args.weights)):
        sam = load_model(args, weights)
        for name, recs in datasets.items():
            results[name][model_name] = score_model(sam, recs, prompts[name], clicks, args.min_region_area,
                                                    protocols, args.prompt_seed, args.tile, args.tile_overlap)
        if args.amg:
            automatic[model_name] = automatic_mask_scores(
                [dict(_protocols.automatic_masks(sam, r.load_image(), points_per_side=args.amg_points_per_side),
                      gt=list(r.load_masks().astype(bool))) for r in datasets["data"]])
        del sam
    summary = {"prompt": args.prompt, "num_points": args.num_points, "prompt_seed": args.prompt_seed, "clicks": clicks,
               "model_type": args.model_type, "checkpoint": args.checkpoint, "weights": args.weights}
    for name in datasets:
        summary[name] = summarize(results[name], metrics, args.bootstrap, args.seed)
        print(table(summary[name], metrics, f"{'reference (forgetting check)' if name == 'reference' else 'data'} {getattr(args, name + '_json') or getattr(args, name + '_dir')}"))
        print()
    for name in datasets:
        for size, part in summary[name].get("by_size", {}).items():
            print(table(part, metrics, f"{name}, {size} objects ({SIZE_NOTE[size]})"))
            print()
    if automatic:
        summary["automatic_masks"] = automatic
        print("automatic masks (SamAutomaticMaskGenerator) against the ground-truth objects of --data_dir:")
        for model in MODELS:
            a = automatic[model]
            print(f"  {'fine-tuned' if model == 'tuned' else 'base':>10}: mask AP@[.5:.95] {a['ap']:.4f}, "
                  f"recall@0.5 {a['recall@0.5']:.4f} ({a['masks']} masks for {a['objects']} objects)")
        print()
    if "reference" in summary:
        summary["forgetting"] = {m: summary["reference"]["difference"][m] for m in metrics}
        lost = summary["forgetting"]["iou"]
        print(f"forgetting check: IoU on the reference data changed by {format_ci(lost, signed=True)} (negative = lost)")
    write_csv(out_dir / "per_object.csv", results, metrics)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    picture = compare_picture(datasets["data"], prompts["data"], results["data"], args.compare_count)
    draw.save_rgb(out_dir / "compare.png", picture)
    written = "per_object.csv, summary.json, compare.png"
    if protocols.noc:
        clicks_figure(results["data"], out_dir / "clicks.png")
        written += ", clicks.png"
    print(f"wrote {out_dir}/{written}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, weights=False)
    parser.add_argument("--weights", required=True, help="fine-tuned partial weights (best.pth)")
    add_data_set(parser, "data", "the data")
    add_data_options(parser)
    add_image_arguments(parser, from_weights=True)  # --data_dir's images (the reference set is read as it is)
    add_tile_arguments(parser)
    parser.add_argument("--split", default="all", choices=["all", "val", "train"],
                        help="val/train: run.py's seeded split of --data_dir (--val_fraction, --seed)")
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--max_images", type=int, default=0, help="use only the first N images of each data set (0 = all)")
    parser.add_argument("--prompt", default="box", choices=list(PROMPTS))
    parser.add_argument("--num_points", type=int, default=1, help="positive points per object for point prompts")
    parser.add_argument("--prompt_seed", type=int, default=0, help="seed of the prompts (per image and object)")
    parser.add_argument("--clicks", help="IoU after these numbers of corrective clicks, e.g. 1,3,5")
    parser.add_argument("--noc", type=int, default=NOC_CAP,
                        help="NoC@85/90 and the IoU-vs-clicks curve up to this many interactions, from a point and "
                             "from a box (0 = off; costs about 2N decoder calls per object)")
    parser.add_argument("--box_noise", default=",".join(str(round(f * 100)) for f in BOX_NOISE),
                        help="IoU with each box side moved by up to these percents of the box size (seeded), or none")
    parser.add_argument("--prompt_following", type=str2bool, nargs="?", const=True, default=True,
                        help="a positive point far from every object (mask area) and box leakage (share outside the box)")
    parser.add_argument("--amg", type=str2bool, nargs="?", const=True, default=False,
                        help="automatic masks of both models scored against the objects: mask AP@[.5:.95], recall@0.5")
    parser.add_argument("--amg_points_per_side", type=int, default=32, help="--amg: the generator's point grid")
    add_data_set(parser, "reference", "forgetting check: a second, generic data set")
    alias(parser, "--reference_data", "reference_dir")
    parser.add_argument("--reference_format", default="auto", choices=list(DATA_FORMATS), help="as --data_format")
    parser.add_argument("--min_region_area", type=int, default=0, help="fill holes / remove islands below this (pixels) first")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    parser.add_argument("--compare_count", type=int, default=3, help="objects per direction in compare.png")
    parser.add_argument("--output_dir", required=True)
    return parser


def run() -> None:
    """Console entry (sam-evaluate): main() returns the summary, which must not become the exit status."""
    cli(main)


if __name__ == "__main__":
    run()
