"""`coco`: a COCO instances JSON (--train_json) and its image folder (--train_images).

One object per annotation; polygons and RLE (compressed and uncompressed) are turned into
compressed RLE with pycocotools once, at check time, so a record carries its objects and never
re-reads the JSON. An annotation whose `category_id` is not in `categories` makes its image a bad
sample (named; --skip_bad leaves the image out). `iscrowd` regions are never training objects (they mark crowds, not one
instance); --categories keeps only the named categories. An image without annotations is a
sample with no objects (a bad sample: --skip_bad leaves it out).
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from ..checks import BadSample, DataError, Problem
from ..image_io import ImageSpec, load_image
from ..records import Record, pick
from . import DataOptions, Scan, finish, size_mismatch


@dataclass(frozen=True)
class Entry:
    """One image of the JSON with its annotations."""

    path: Path
    image_id: int
    size: Tuple[int, int]  # (H, W) from the JSON
    annotations: tuple  # the annotation dicts
    json: str


def to_rle(segmentation, h: int, w: int) -> dict:
    """Any COCO segmentation -> one compressed RLE dict."""
    if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation


def decode(rles: List[dict], size: Tuple[int, int]) -> np.ndarray:
    """uint8 (N, H, W) from compressed RLEs (the list form of pycocotools' decode)."""
    if not rles:
        return np.zeros((0, *size), np.uint8)
    return np.ascontiguousarray(mask_utils.decode(list(rles)).transpose(2, 0, 1))


@dataclass(frozen=True)
class CocoRecord(Record):
    objects: Tuple[Tuple[int, dict], ...] = ()  # (annotation id, compressed RLE) per object
    image_spec: ImageSpec = ImageSpec()

    @property
    def annotation_ids(self) -> Tuple[int, ...]:
        return tuple(a for a, _ in self.objects)

    def load_image(self) -> np.ndarray:
        return load_image(self.image, self.image_spec)

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = pick(indices, len(self.objects))
        return decode([self.objects[i][1] for i in chosen], self.size)


def _bad_polygon(ann: dict) -> bool:
    seg = ann.get("segmentation")
    return isinstance(seg, list) and (not seg or any(len(p) < 6 for p in seg))


def build(entry: Entry, opts: DataOptions, names: dict):
    if not entry.path.is_file():
        raise BadSample("missing file", f"{entry.path}: file does not exist (image id {entry.image_id} in {entry.json})")
    image = load_image(entry.path, opts.image_spec)
    h, w = image.shape[:2]
    if (h, w) != entry.size:
        raise size_mismatch(str(entry.path), image, f"{entry.json} (image id {entry.image_id})", entry.size)
    drops: Counter = Counter()
    objects, categories = [], []
    for ann in entry.annotations:
        if ann.get("category_id") not in names:  # no silent class "99" in semantic mode, no unnamed object
            known = ", ".join(str(k) for k in sorted(names, key=str)) or "none: the file has no 'categories' list"
            raise BadSample("unknown category", f"{entry.json}: annotation {ann.get('id')} of {entry.path.name} has "
                                                f"category_id {ann.get('category_id')}, which is not in 'categories' (ids: {known})")
        name = names[ann["category_id"]]
        if ann.get("iscrowd"):
            drops["crowd region (iscrowd)"] += 1
        elif opts.categories and name not in opts.categories:
            drops["not in --categories"] += 1
        elif _bad_polygon(ann) or "segmentation" not in ann:
            raise BadSample("bad shape", f"{entry.json}: annotation {ann.get('id')} of {entry.path.name} has no "
                                         "usable segmentation (a polygon needs at least 3 points)")
        else:
            objects.append((int(ann["id"]), to_rle(ann["segmentation"], h, w)))
            categories.append(name)
    record = CocoRecord(str(entry.path), (h, w), entry.json, tuple(categories), tuple(objects), opts.image_spec)
    masks = decode([rle for _, rle in objects], (h, w))
    return finish(record, image, masks, opts, drops)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: COCO JSON does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO instances file (no 'images' list)")
    return data


IMAGE_KEYS = ("id", "file_name", "height", "width")


def _categories(data: dict, json_path: Path) -> dict:
    """{category id: name}; DataError for a 'categories' that is not a list of {id, name}."""
    categories = data.get("categories", [])
    if not isinstance(categories, list) or not all(isinstance(c, dict) and {"id", "name"} <= c.keys() for c in categories):
        raise DataError(f"{json_path}: 'categories' is not a list of {{\"id\": ..., \"name\": ...}} entries")
    return {c["id"]: str(c["name"]) for c in categories}


def scan(json_path, images, opts: DataOptions) -> Scan:
    json_path, images = Path(json_path), Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: image folder does not exist")
    data = _read(json_path)
    names = _categories(data, json_path)
    unknown = sorted(set(opts.categories) - set(names.values()))
    if unknown:
        raise DataError(f"--categories {','.join(unknown)}: not in {json_path} (it has {', '.join(sorted(names.values()))})")
    problems: List[Problem] = []
    listed = []  # (image id, file name, (H, W)) of the usable image entries
    for i, im in enumerate(data["images"]):
        missing = [k for k in IMAGE_KEYS if k not in im] if isinstance(im, dict) else list(IMAGE_KEYS)
        why = f"has no {', '.join(map(repr, missing))}" if missing else None
        if not missing:
            try:
                listed.append((int(im["id"]), str(im["file_name"]), (int(im["height"]), int(im["width"]))))
            except (TypeError, ValueError):
                why = "id, height and width must be whole numbers"
        if why:
            problems.append(Problem("bad entry", f"{json_path}: images[{i}] {why} (a COCO image entry has "
                                                 "id, file_name, height and width)"))
    by_image = {image_id: [] for image_id, _, _ in listed}
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{json_path}: 'annotations' is not a list")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.append(Problem("bad entry", f"{json_path}: annotations[{i}] is not an object"))
            continue
        image_id = ann.get("image_id")
        if not isinstance(image_id, int) or image_id not in by_image:
            problems.append(Problem("missing image", f"{json_path}: annotation {ann.get('id')} refers to image id "
                                                     f"{image_id}, which is not in 'images'"))
        else:
            by_image[image_id].append(ann)
    entries = [Entry(images / name, image_id, size, tuple(by_image[image_id]), str(json_path))
               for image_id, name, size in listed]
    return Scan("coco", str(json_path), entries, lambda e: build(e, opts, names), problems,
                lambda e: (str(e.path), ()), lambda e, o: build(e, o, names))
