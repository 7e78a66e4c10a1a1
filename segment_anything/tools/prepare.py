"""See the data as training will: every object as its own binary mask, its box, and an overlay.

    python -m segment_anything.tools.prepare --data_dir data/train --output_dir prepared --visualize
    python -m segment_anything.tools.prepare --data_json ann.json --data_images imgs/ --output_dir prepared

Writes OUT/images/<stem>.png (decoded: EXIF applied, 8-bit RGB), OUT/masks/<stem>_<k>.png (one
binary mask per object, 0/255), OUT/objects.json (per image: size, source and each object's box
xyxy in pixels, category, area in pixels, sampled points [x, y, label]) and with --visualize
OUT/overlays/<stem>.png (every object's outline, box and points on the photo, in its own colour;
points drawn as training draws them: --prompt, --num_points, --point_mode, --negative_points). Bad samples stop the tool with every problem listed, as in training; with
--skip_bad they are left out and listed in OUT/skipped.txt.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np

from ..utils.data.checks import DataError, raise_problems, summary
from ..utils.data.formats import DATA_FLAGS, DataOptions
from ..utils.data.prepare import describe, load_split
from ..utils.data.prompts import POINT_MODES, PROMPTS, PromptConfig, object_prompts
from ..utils.data.records import Record
from ..utils.image_spec import add_arguments as add_image_arguments
from ._cli import cli
from ._flags import add_data_options, add_data_set, alias


def colours(n: int) -> np.ndarray:
    """n distinct saturated RGB colours, uint8 (n, 3)."""
    hsv = np.stack([np.arange(n) * 180 // max(n, 1), np.full(n, 230), np.full(n, 255)], 1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def overlay(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, points=None, labels=None) -> np.ndarray:
    """RGB uint8 (H, W, 3): each object's outline, box and points (N, K, 2) drawn in its colour;
    positive points (label 1) filled with a white ring, negative ones (0) black-filled, padding (-1) not drawn."""
    out = image.copy()
    width = max(1, round(max(image.shape[:2]) / 400))
    for mask, box, colour in zip(masks, boxes, colours(len(masks)).tolist()):
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour, width)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, width)
    if points is not None:
        for obj_points, obj_labels, colour in zip(points, labels, colours(len(masks)).tolist()):
            for (x, y), label in zip(obj_points, obj_labels):
                if label < 0:
                    continue
                centre, r = (int(round(x)), int(round(y))), 2 * width + 1
                cv2.circle(out, centre, r, colour if label > 0 else (0, 0, 0), -1)
                cv2.circle(out, centre, r, (255, 255, 255) if label > 0 else colour, max(1, width // 2))
    return out


def _stem(record: Record, used: Dict[str, int], planes: bool) -> str:
    """The file's stem; with --plane all (planes), '<stem>_plane<k>' for plane k of a stack."""
    stem = Path(record.image).stem + (f"_plane{record.plane}" if planes and record.plane is not None else "")
    used[stem] = used.get(stem, 0) + 1
    return stem if used[stem] == 1 else f"{stem}_{used[stem] - 1}"


def _write(path: Path, rgb_or_mask: np.ndarray) -> None:
    array = cv2.cvtColor(rgb_or_mask, cv2.COLOR_RGB2BGR) if rgb_or_mask.ndim == 3 else rgb_or_mask
    ok, data = cv2.imencode(".png", array)
    path.write_bytes(data.tobytes())  # write_bytes: non-ASCII paths work everywhere


def export(records: List[Record], out: Path, visualize: bool = False, prompts: PromptConfig = PromptConfig(),
           seed: int = 0, planes: bool = False) -> List[dict]:
    """Write images, masks, overlays for records into out; returns the objects.json entries (with
    the plane of a stack's planes). Points are drawn as training draws them, from a generator seeded by (seed, image index)."""
    for sub in ("images", "masks") + (("overlays",) if visualize else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entries, used = [], {}
    for index, record in enumerate(records):
        stem = _stem(record, used, planes)
        image, masks = record.load_image(), record.load_masks()
        rng = np.random.default_rng([seed, index])
        boxes, points, labels = (np.stack(v) for v in zip(*(object_prompts(m, prompts, rng) for m in masks)))
        _write(out / "images" / f"{stem}.png", image)
        objects = []
        for k, (mask, box, category) in enumerate(zip(masks, boxes, record.categories)):
            _write(out / "masks" / f"{stem}_{k}.png", mask * 255)
            objects.append({"mask": f"masks/{stem}_{k}.png", "box": [float(v) for v in box],
                            "category": category, "area": int(mask.sum()),
                            "points": [[float(x), float(y), int(lab)] for (x, y), lab in zip(points[k], labels[k]) if lab >= 0]})
        if visualize:
            _write(out / "overlays" / f"{stem}.png", overlay(image, masks, boxes, points, labels))
        entry = {"image": f"images/{stem}.png", "original": record.image, "source": record.source,
                 "size": list(record.size), "objects": objects}
        entries.append(entry if record.plane is None else dict(entry, plane=record.plane))
    return entries


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_set(p, "data", "the data")
    alias(p, "--json", "data_json")
    alias(p, "--images", "data_images")
    add_data_options(p)
    add_image_arguments(p)
    p.add_argument("--output_dir", required=True, help="where to write images/, masks/, objects.json")
    p.add_argument("--visualize", action="store_true", help="also write overlays/<stem>.png")
    p.add_argument("--prompt", default="box+point", choices=list(PROMPTS), help="prompts to sample and draw")
    p.add_argument("--num_points", type=int, default=1, help="positive points per object")
    p.add_argument("--point_mode", default="center", choices=list(POINT_MODES))
    p.add_argument("--negative_points", type=int, default=0, help="background points per object, from its box")
    p.add_argument("--seed", type=int, default=0, help="seed of the random points")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.data_dir and args.data_dir.endswith(".json") and not args.data_json:
        args.data_dir, args.data_json = None, args.data_dir
    coco = args.data_format == "coco" or (args.data_format == "auto" and args.data_json)
    if coco and not (args.data_json and args.data_images):
        sys.exit("error: COCO data needs --data_json and --data_images")
    if not coco and not args.data_dir:
        sys.exit("error: --data_dir is required (or --data_json and --data_images for COCO)")
    try:
        opts = DataOptions.from_flags(**{name: getattr(args, name) for name in DATA_FLAGS})
    except ValueError as err:
        sys.exit(f"error: {err}")
    out = Path(args.output_dir)
    try:
        loaded = load_split("coco" if coco else args.data_format, args.data_json if coco else args.data_dir, opts,
                            args.data_images)
        if not args.skip_bad:
            raise_problems(loaded.problems, loaded.source)
        if not loaded.records:
            raise DataError(f"{loaded.source}: no usable images ({loaded.total} listed)")
    except DataError as err:
        sys.exit(f"error: {err}")
    prompts = PromptConfig(args.prompt, args.num_points, args.point_mode, args.negative_points)
    entries = export(loaded.records, out, args.visualize, prompts, args.seed, opts.image_spec.every)
    info = {"source": loaded.source, "format": loaded.fmt, "instance_mode": args.instance_mode,
            "dropped": dict(loaded.drops), "images": entries}
    (out / "objects.json").write_text(json.dumps(info, indent=1))
    print(f"{loaded.source}: {loaded.fmt} format, {describe(loaded.records, loaded.drops)}")
    if loaded.problems:
        (out / "skipped.txt").write_text("".join(f"{p}\n" for p in loaded.problems))
        print(f"{summary(loaded.problems, loaded.total)}; full list in {out / 'skipped.txt'}")
    print(f"wrote {out / 'objects.json'}, {len(entries)} images in {out / 'images'}, masks in {out / 'masks'}"
          + (f", overlays in {out / 'overlays'}" if args.visualize else ""))
    return 0


def run() -> None:
    """Console entry (sam-prepare): main() through cli(), so bad input and Ctrl-C end in one line."""
    cli(main)


if __name__ == "__main__":
    run()
