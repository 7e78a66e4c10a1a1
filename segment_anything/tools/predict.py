"""Segment images with SAM (plus fine-tuned weights) from box / point prompts, or automatically.

    python -m segment_anything.tools.predict --model_type vit_b --checkpoint sam_vit_b_01ec64.pth \
        --weights runs/<run>/best.pth --image photo.jpg --box 10,20,300,400 --output_dir out/
    python -m segment_anything.tools.predict ... --image photos/ --prompts prompts.json --output_dir out/
    python -m segment_anything.tools.predict ... --image photo.jpg --output_dir out/  # automatic masks

Per image it writes <stem>_mask_<i>.png (object i, 0/255; with --multimask
<stem>_mask_<i>_<k>.png for SAM's three candidates) and <stem>_overlay.png (the masks over the
image, the prompts drawn). Without any prompt, automatic masks: <stem>_mask_<i>.png per mask
(largest first), <stem>_overlay.png and <stem>_auto.json (records with COCO RLE). With --task
semantic and the best.pth of a semantic run: class maps, see tools/_semantic.py. With --tile S
(and --tile_overlap O) a large image is cut into overlapping S x S tiles seen at full resolution:
each prompt is decoded in the tile that holds it best, automatic masks are found per tile and
merged across tile borders; the masks are written at the image's full size as without tiles.

prompts.json maps an image file name (or stem) to one object or a list of objects, each with an
optional "box" [x1, y1, x2, y2] and optional "points" [[x, y, label], ...] (label 1 = object,
0 = background; default 1), in original-image pixels:

    {"a.jpg": {"box": [10, 20, 300, 400]},
     "b.jpg": [{"points": [[50, 60, 1], [70, 80, 0]]}, {"box": [5, 5, 90, 90], "points": [[40, 40]]}]}
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from ..automatic_mask_generator import SamAutomaticMaskGenerator
from ..predictor import SamPredictor
from ..tiled_mask_generator import TiledMaskGenerator
from ..tiled_predictor import TiledPredictor
from ..utils import draw
from ..utils.amg import coco_encode_rle, mask_to_rle_pytorch
from ..utils.data import load_image
from ..utils.data.image_io import load_image_planes
from ..utils.image_spec import ImageSpec, add_arguments as add_image_arguments
from ..utils.postprocess import clean_masks
from ..utils.tiles import add_arguments as add_tile_arguments, check_arguments as check_tile_arguments
from ._flags import alias
from ._cli import at_least, cli, output_folder
from ._model import add_model_args, image_spec_as_trained, load_model
from ._semantic import load_semantic_model, predict_classes, write_semantic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
Prompt = Dict[str, Optional[np.ndarray]]  # "box" (4,), "points" (K, 2), "labels" (K,)


def parse_box(text: str, where: str = "--box") -> np.ndarray:
    try:
        box = np.array([float(v) for v in (text.split(",") if isinstance(text, str) else text)], dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a box is x1,y1,x2,y2 in pixels, got {text!r}") from None
    if box.shape != (4,) or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: a box is x1,y1,x2,y2 with x1 <= x2 and y1 <= y2, got {text!r}")
    return box


def parse_point(value: Any, where: str = "--point") -> Tuple[float, float, int]:
    try:
        parts = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in (0, 1)):
        raise ValueError(f"{where}: a point is x,y or x,y,label with label 1 (object) or 0 (background), got {value!r}")
    return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 1


def make_prompt(box: Optional[np.ndarray], points: List[Tuple[float, float, int]], box_where: str = "--box",
                point_where: Optional[List[str]] = None) -> Prompt:
    """A prompt, with the words that name its box and each point in messages ("--box 1,2,3,4")."""
    coords = np.array([p[:2] for p in points], np.float32) if points else None
    labels = np.array([p[2] for p in points], np.int64) if points else None
    return {"box": box, "points": coords, "labels": labels, "box_where": box_where,
            "point_where": point_where or [f"point {x:g},{y:g}" for x, y, _ in points]}


def fit_to_image(prompt: Prompt, image: str, hw: Tuple[int, int]) -> Tuple[Prompt, Optional[str]]:
    """The prompt checked against the image's size: a box or point wholly outside it is an
    error (SAM would still return a mask, for nothing the user meant); a box partly outside is
    clipped to the image, and the note returned says so."""
    h, w = hw
    size = f"{image} ({w}x{h} pixels)"
    for (x, y), where in zip(prompt["points"] if prompt["points"] is not None else [], prompt["point_where"]):
        if not (0 <= x <= w and 0 <= y <= h):
            raise ValueError(f"{where} lies outside {size}")
    box = prompt["box"]
    if box is None:
        return prompt, None
    if box[0] >= w or box[1] >= h or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"{prompt['box_where']} lies outside {size}")
    clipped = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
    if (clipped == box).all():
        return prompt, None
    note = f"note: {prompt['box_where']} extends past {size}; clipped to {','.join(f'{v:g}' for v in clipped)}"
    return dict(prompt, box=clipped), note


def load_prompts(path: Path) -> Dict[str, List[Prompt]]:
    """{image name or stem: [prompt, ...]} from a prompts JSON file (format in the module doc)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot read JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--prompts {path}: expected an object mapping image names to prompts")
    out = {}
    for name, objects in raw.items():
        objects = objects if isinstance(objects, list) else [objects]
        prompts = []
        for i, obj in enumerate(objects):
            where = f"--prompts {path}, {name!r} object {i}"
            if not isinstance(obj, dict) or not ({"box", "points"} & obj.keys()) or set(obj) - {"box", "points"}:
                raise ValueError(f"{where}: expected {{\"box\": [x1, y1, x2, y2], \"points\": [[x, y, label], ...]}}, got {obj!r}")
            box = parse_box(obj["box"], where) if obj.get("box") is not None else None
            points = [parse_point(p, where) for p in obj.get("points") or []]
            if box is None and not points:
                raise ValueError(f"{where}: neither a box nor any point")
            prompts.append(make_prompt(box, points, f"{where}: box {obj.get('box')}",
                                       [f"{where}: point {p}" for p in obj.get("points") or []]))
        out[name] = prompts
    return out


def list_images(path: Path) -> List[Path]:
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"--image {path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return images
    if not path.is_file():
        raise FileNotFoundError(f"--image {path} not found")
    return [path]


def plan(args: argparse.Namespace, spec: ImageSpec = ImageSpec()) -> List[Tuple[Path, Optional[List[Prompt]]]]:
    """(image, prompts or None for automatic masks) per image; every input check happens here,
    before the model is loaded (prompts against the sizes of their images too; with --plane all,
    against the first plane: the planes of a stack share one size)."""
    first = dataclasses.replace(spec, plane=0) if args.plane == "all" else spec
    jobs = []
    for path, prompts in pair_prompts(args):
        if prompts is not None:
            hw = load_image(path, first).shape[:2]
            fitted = [fit_to_image(p, path.name, hw) for p in prompts]
            for _, note in fitted:
                if note:
                    print(note)
            prompts = [p for p, _ in fitted]
        jobs.append((path, prompts))
    return jobs


def pair_prompts(args: argparse.Namespace) -> List[Tuple[Path, Optional[List[Prompt]]]]:
    """(image, its prompts from the flags or --prompts, or None for automatic masks)."""
    images = list_images(Path(args.image))
    cli_points = [parse_point(p) for p in args.point or []]
    cli_box = parse_box(args.box) if args.box else None
    if args.prompts:
        if cli_box is not None or cli_points:
            raise ValueError("give prompts either with --prompts or with --box/--point, not both")
        table = load_prompts(Path(args.prompts))
        by_name = {p.name: p for p in images} | {p.stem: p for p in images}
        missing = [name for name in table if name not in by_name]
        if missing:
            raise ValueError(f"--prompts {args.prompts} names images not in --image {args.image}: {missing[:5]}")
        chosen = {by_name[name]: prompts for name, prompts in table.items()}
        return [(p, chosen[p]) for p in images if p in chosen]
    if cli_box is not None or cli_points:
        return [(p, [make_prompt(cli_box, cli_points, f"--box {args.box}", [f"--point {t}" for t in args.point or []])])
                for p in images]
    return [(p, None) for p in images]


def planes_of(jobs, spec, every: bool):
    """(path, prompts, plane or None, RGB image) per image, and per plane of a stack with --plane
    all (every); a plain image has plane None. The same prompts apply to every plane."""
    for path, prompts in jobs:
        for plane, _, image in load_image_planes(path, spec, every):
            yield path, prompts, plane, image


def predict_prompts(predictor: SamPredictor, prompts: List[Prompt], multimask: bool, min_area: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(masks (C, H, W) bool, scores (C,)) per prompt; C = 3 with multimask, else 1."""
    out = []
    for prompt in prompts:
        masks, scores, _ = predictor.predict(prompt["points"], prompt["labels"], prompt["box"], multimask_output=multimask)
        out.append((clean_masks(masks, min_area), scores))
    return out


def write_prompted(out_dir: Path, stem: str, image: np.ndarray, prompts: List[Prompt], results) -> None:
    best = []
    for i, (masks, scores) in enumerate(results):
        for k, mask in enumerate(masks):
            name = f"{stem}_mask_{i}_{k}.png" if len(masks) > 1 else f"{stem}_mask_{i}.png"
            cv2.imwrite(str(out_dir / name), mask.astype(np.uint8) * 255)
        best.append(masks[int(np.argmax(scores))])
    picture = draw.overlay(image, best)
    for prompt in prompts:
        picture = draw.draw_prompt(picture, prompt["box"], prompt["points"], prompt["labels"])
    draw.save_rgb(out_dir / f"{stem}_overlay.png", picture)


def write_automatic(out_dir: Path, stem: str, image: np.ndarray, records: List[Dict[str, Any]]) -> None:
    """Masks largest first, the overlay and the records; with no mask, the image itself as the
    overlay and an empty list, so every image has its files."""
    records = sorted(records, key=lambda r: -r["area"])
    for i, record in enumerate(records):
        cv2.imwrite(str(out_dir / f"{stem}_mask_{i}.png"), record["segmentation"].astype(np.uint8) * 255)
    draw.save_rgb(out_dir / f"{stem}_overlay.png", draw.overlay(image, [r["segmentation"] for r in records]))
    listing = [dict(r, segmentation=coco_encode_rle(mask_to_rle_pytorch(torch.from_numpy(r["segmentation"])[None])[0]))
               for r in records]
    (out_dir / f"{stem}_auto.json").write_text(json.dumps(listing))


def glue_coordinates(argv: List[str]) -> List[str]:
    """`--box -20,30,150,400` as `--box=-20,30,150,400`: argparse takes a value that starts with
    '-' and is not a plain number for a flag, and a box may start left of the image."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in ("--box", "--point") and arg[:1] == "-" and (arg[1:2].isdigit() or arg[1:2] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--image", required=True, help="an image file or a folder of images")
    add_image_arguments(parser, from_weights=True)
    add_tile_arguments(parser)
    parser.add_argument("--box", help="x1,y1,x2,y2 in pixels")
    parser.add_argument("--point", action="append", help="x,y[,label] in pixels (label 1 object, 0 background); repeatable")
    parser.add_argument("--prompts", help="JSON file: image name -> prompts (see the module doc)")
    parser.add_argument("--multimask", action="store_true", help="write SAM's three candidate masks per prompt")
    parser.add_argument("--min_region_area", type=int, default=0, help="fill holes and remove islands smaller than this (pixels)")
    parser.add_argument("--points_per_side", type=int, default=32, help="automatic masks: grid points per side")
    parser.add_argument("--pred_iou_thresh", type=float, default=0.88, help="automatic masks: predicted-IoU filter")
    parser.add_argument("--stability_score_thresh", type=float, default=0.95, help="automatic masks: stability filter")
    parser.add_argument("--task", default="prompt", choices=["prompt", "semantic"],
                        help="semantic: class maps from a --task semantic run's --weights (no prompts)")
    parser.add_argument("--output_dir", help="output folder (required)")
    alias(parser, "--output", "output_dir")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(glue_coordinates(sys.argv[1:] if argv is None else list(map(str, argv))))
    if not args.output_dir:
        parser.error("the following arguments are required: --output_dir")
    if args.task == "semantic":
        return main_semantic(args)

    spec = image_spec_as_trained(args, args.weights)
    check_tile_arguments(args)
    at_least(args, points_per_side=1, min_region_area=0)
    jobs = plan(args, spec)
    sam = load_model(args, args.weights)
    with output_folder(Path(args.output_dir)) as out_dir:
        predict_all(args, spec, jobs, sam, out_dir)
    print(f"wrote {args.output_dir}")


def predict_all(args: argparse.Namespace, spec: ImageSpec, jobs, sam, out_dir: Path) -> None:
    """Prompted or automatic masks for every image (and plane) of jobs, written into out_dir."""
    predictor = TiledPredictor(sam, args.tile, args.tile_overlap) if args.tile else SamPredictor(sam)
    generator = None
    for path, prompts, plane, image in planes_of(jobs, spec, args.plane == "all"):
        stem, name = (path.stem, path.name) if plane is None else (f"{path.stem}_plane{plane}", f"{path.name} plane {plane}")
        if prompts is None:
            amg_args = dict(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                            stability_score_thresh=args.stability_score_thresh,
                            min_mask_region_area=args.min_region_area)
            generator = generator or (TiledMaskGenerator(sam, args.tile, args.tile_overlap, **amg_args) if args.tile
                                      else SamAutomaticMaskGenerator(sam, **amg_args))
            with torch.no_grad():
                records = generator.generate(image)
            write_automatic(out_dir, stem, image, records)
            print(f"{name}: {len(records)} automatic masks" if records else
                  f"{name}: no automatic mask passed --pred_iou_thresh {args.pred_iou_thresh:g} and "
                  f"--stability_score_thresh {args.stability_score_thresh:g} (lower them to keep more); "
                  "wrote the image unchanged as the overlay and an empty list")
        else:
            predictor.set_image(image)
            write_prompted(out_dir, stem, image, prompts, predict_prompts(predictor, prompts, args.multimask, args.min_region_area))
            print(f"{name}: {len(prompts)} object(s)")


def main_semantic(args: argparse.Namespace) -> None:
    if args.box or args.point or args.prompts:
        raise ValueError("--task semantic takes no prompts (--box, --point, --prompts)")
    images = list_images(Path(args.image))
    sam, classes = load_semantic_model(args)
    spec = image_spec_as_trained(args, args.weights)
    with output_folder(Path(args.output_dir)) as out_dir:
        for path in images:
            image = load_image(path, spec)
            labels = predict_classes(sam, image)
            write_semantic(out_dir, path.stem, image, labels, len(classes))
            found = ", ".join(f"{classes[c]} {n}" for c, n in zip(*np.unique(labels, return_counts=True)))
            print(f"{path.name}: pixels per class: {found}")
    print(f"wrote {out_dir}")


def run() -> None:
    """Console entry (sam-predict): main() through cli(), so bad input and Ctrl-C end in one line."""
    cli(main)


if __name__ == "__main__":
    run()
