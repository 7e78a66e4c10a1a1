"""`labelme`: DIR/**/*.json written by labelme, the image beside it (`imagePath`, relative to the
JSON) or embedded as base64 `imageData` when that file is missing or is no image (labelme's own
tutorial files name the JSON itself as `imagePath`; labelme then shows `imageData`).

Objects: one per shape of type polygon, rectangle, circle or mask; shapes sharing a non-null
`group_id` (and label) are one object, as in labelme's own instance export. Labels starting with
`__ignore__` are not objects; --labels keeps only the listed labels; line and point shapes have
no area and are counted as dropped. Shapes are rasterised with Pillow as labelme draws them.
"""

import base64
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..checks import BadSample
from ..image_io import ImageSpec, decode_image, is_image_file, load_image, read_bytes
from ..records import Record, pick, stack_masks
from . import DataOptions, Scan, finish

AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
MIN_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 2}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample("bad JSON", f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise BadSample("bad JSON", f"{path}: not a labelme file (no 'shapes' list)")
    return data


def image_source(path: Path, data: dict) -> Tuple[Optional[Path], bool]:
    """(image file, embedded): the image file beside the JSON if there is one, else the JSON's imageData."""
    rel = data.get("imagePath")
    image = (path.parent / rel) if rel else None
    beside = image is not None and image.is_file() and image.resolve() != path.resolve()
    if beside and (is_image_file(image) or not data.get("imageData")):
        return image, False
    if data.get("imageData"):
        return None, True
    if image is not None and image.is_file():  # the JSON itself, and nothing embedded
        raise BadSample("missing image", f"{path}: imagePath {rel!r} is this JSON file and there is no imageData")
    raise BadSample("missing image", f"{path}: imagePath {rel!r} does not exist ({image}) and there is no imageData")


def embedded_image(path: Path, data: dict, image_spec: ImageSpec) -> np.ndarray:
    try:
        raw = base64.b64decode(data["imageData"], validate=False)
    except (ValueError, TypeError) as err:
        raise BadSample("unreadable", f"{path}: imageData is not base64 ({err})") from None
    return decode_image(raw, f"{path} (imageData)", image_spec)


def shape_mask(shape: dict, size: Tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) {0, 1} of one shape, drawn like labelme's shape_to_mask."""
    h, w = size
    kind = shape.get("shape_type") or "polygon"
    points = [(float(x), float(y)) for x, y in shape["points"]]
    if kind == "mask":
        patch = np.array(Image.open(io.BytesIO(base64.b64decode(shape["mask"])))) > 0
        x0, y0 = (int(v) for v in points[0])
        out = np.zeros((h, w), np.uint8)
        ys, xs = slice(max(y0, 0), min(y0 + patch.shape[0], h)), slice(max(x0, 0), min(x0 + patch.shape[1], w))
        out[ys, xs] = patch[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return out
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "rectangle":
        (x0, y0), (x1, y1) = points[:2]
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind == "circle":
        (cx, cy), (px, py) = points[:2]
        r = ((cx - px) ** 2 + (cy - py) ** 2) ** 0.5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    else:
        draw.polygon(points, outline=1, fill=1)
    return np.array(canvas, dtype=np.uint8)


@dataclass(frozen=True)
class LabelmeRecord(Record):
    objects: Tuple[Tuple[int, ...], ...] = ()  # shape indices of each object
    embedded: bool = False  # image decoded from the JSON's imageData
    image_spec: ImageSpec = ImageSpec()

    def load_image(self) -> np.ndarray:
        if self.embedded:
            return embedded_image(Path(self.source), read_json(Path(self.source)), self.image_spec)
        return load_image(self.image, self.image_spec)

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = pick(indices, len(self.objects))
        shapes = read_json(Path(self.source))["shapes"]
        return stack_masks([_object_mask(shapes, self.objects[i], self.size) for i in chosen], self.size)


def _object_mask(shapes: List[dict], members: Sequence[int], size: Tuple[int, int]) -> np.ndarray:
    return np.max([shape_mask(shapes[k], size) for k in members], 0)


def _check_shape(path: Path, k: int, shape: dict, mask: np.ndarray) -> None:
    kind, label, n = shape.get("shape_type") or "polygon", shape.get("label"), len(shape.get("points") or [])
    if n < MIN_POINTS[kind]:
        raise BadSample("bad shape", f"{path}: shape {k} ({label!r}) is a {kind} with {n} point(s); "
                                     f"needs at least {MIN_POINTS[kind]}")
    if not mask.any():
        xs, ys = [p[0] for p in shape["points"]], [p[1] for p in shape["points"]]
        h, w = mask.shape
        if max(xs) < 0 or max(ys) < 0 or min(xs) >= w or min(ys) >= h:
            raise BadSample("bad shape", f"{path}: shape {k} ({label!r}) lies entirely outside the {w}x{h} image")


def _group(path: Path, shapes: List[dict], opts: DataOptions, drops: Counter) -> Dict[tuple, List[int]]:
    """Object key -> shape indices, in order of first appearance."""
    groups: Dict[tuple, List[int]] = {}
    for k, shape in enumerate(shapes):
        label, kind = str(shape.get("label", "")), shape.get("shape_type") or "polygon"
        if label.startswith("__ignore__"):
            drops["__ignore__ label"] += 1
        elif opts.labels and label not in opts.labels:
            drops["not in --labels"] += 1
        elif kind not in AREA_SHAPES:
            drops[f"{kind} shape (no area)"] += 1
        elif not isinstance(shape.get("points"), list):
            raise BadSample("bad shape", f"{path}: shape {k} ({label!r}) has no points list")
        else:
            gid = shape.get("group_id")
            groups.setdefault((label, gid) if gid is not None else (label, None, k), []).append(k)
    return groups


def build(path: Path, opts: DataOptions):
    data = read_json(path)
    image_path, embedded = image_source(path, data)
    image = embedded_image(path, data, opts.image_spec) if embedded else load_image(image_path, opts.image_spec)
    h, w = image.shape[:2]
    jh, jw = data.get("imageHeight"), data.get("imageWidth")
    if jh and jw and (int(jh), int(jw)) != (h, w):
        raise BadSample("size mismatch", f"size mismatch: {path} says {jw}x{jh}, image "
                                         f"{image_path or 'imageData'} is {w}x{h} (WxH)")
    drops: Counter = Counter()
    groups = _group(path, data["shapes"], opts, drops)
    masks = []
    for members in groups.values():
        for k in members:
            masks.append(shape_mask(data["shapes"][k], (h, w)))
            _check_shape(path, k, data["shapes"][k], masks[-1])
        masks[-len(members):] = [np.max(masks[-len(members):], 0)]
    record = LabelmeRecord(str(path if embedded else image_path), (h, w), str(path),
                           tuple(key[0] for key in groups), tuple(tuple(m) for m in groups.values()),
                           embedded, opts.image_spec)
    return finish(record, image, stack_masks(masks, (h, w)), opts, drops)


def scan(root, opts: DataOptions) -> Scan:
    root = Path(root)
    files = sorted(p for p in root.rglob("*.json") if not any(s.startswith(".") for s in p.relative_to(root).parts))
    return Scan("labelme", str(root), files, lambda p: build(p, opts), files=json_files, build_with=build)


def json_files(path: Path) -> Tuple[Optional[str], Tuple[str, ...]]:
    """The image beside the JSON (None when embedded); the shapes are the labels, drawn on every plane."""
    image, _ = image_source(path, read_json(path))
    return (str(image) if image is not None else None), ()
