"""Small deterministic synthetic datasets for the demo and the tests
(command line: python -m segment_anything.tools.synthetic_data).

kind folder (images/ + labels/ binary masks), objects (<id>/images/ + <id>/masks/, one file per
object) or instance_map (image/ + mask/ 16-bit label images). Each object is a filled ellipse or
star-shaped polygon, saturated and striped on a muted blotchy background, so SAM's decoder can
learn it from a box; several objects sit in separate grid cells and never touch.
"""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .checks import DataError

MARKER = ".synthetic"
KINDS = ("folder", "objects", "instance_map")


def _texture(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1], float32 (h, w); cells sets how coarse it is."""
    small = rng.random((max(h // cells, 2), max(w // cells, 2)), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _object_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 (h, w) {0, 255}: one filled ellipse or star-shaped polygon, well inside the frame."""
    mask = np.zeros((h, w), np.uint8)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
    if rng.random() < 0.5:
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(mask, (round(cx), round(cy)), (round(rx), round(ry)), angle, 0, 360, 255, -1)
    else:
        k = int(rng.integers(5, 10))
        # Jittered but evenly spread angles keep the polygon from degenerating into a sliver.
        t = (np.arange(k) + rng.uniform(0.0, 0.7, k)) * (2 * np.pi / k)
        r = rng.uniform(0.6, 1.0, k)
        pts = np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1)
        cv2.fillPoly(mask, [pts.round().astype(np.int32)], 255)
    return mask


def _object_masks(rng: np.random.Generator, h: int, w: int, k: int) -> list:
    """k uint8 (h, w) {0, 255} masks, each inside its own cell of a grid (so they never touch)."""
    if k == 1:
        return [_object_mask(rng, h, w)]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    cells = rng.permutation(rows * cols)[:k]
    masks = []
    for c in sorted(cells.tolist()):
        r, q = divmod(c, cols)
        y0, y1, x0, x1 = r * h // rows, (r + 1) * h // rows, q * w // cols, (q + 1) * w // cols
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = _object_mask(rng, y1 - y0, x1 - x0)
        masks.append(mask)
    return masks


def _synthetic_image(rng: np.random.Generator, size_range, k: int) -> tuple:
    """(RGB uint8 (H, W, 3), list of k masks uint8 (H, W) {0, 255}) with clearly distinct objects."""
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    masks = _object_masks(rng, h, w, k)
    # Muted, blotchy background; saturated, finely striped objects: distinct in colour and texture.
    grey = 60 + 120 * _texture(rng, h, w, 24) + 25 * _texture(rng, h, w, 4)
    image = np.repeat(grey[..., None], 3, 2) * rng.uniform(0.85, 1.0, 3)
    yy, xx = np.mgrid[:h, :w]
    for mask in masks:
        colour = np.zeros(3)
        colour[rng.permutation(3)[:2]] = (255, rng.uniform(0, 120))
        stripes = 0.8 + 0.2 * np.sin((xx + yy) * rng.uniform(0.4, 0.8))
        image = np.where(mask[..., None] > 0, colour * stripes[..., None], image)
    return image.clip(0, 255).astype(np.uint8), masks


def _imwrite(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")


def _write_synthetic(root: Path, params: dict) -> None:
    rng = np.random.default_rng(params["seed"])
    kind, k = params.get("kind", "folder"), params.get("objects", 1)
    image_dir, mask_dir = ("images", "labels") if params["layout"] == "images" else ("image", "mask")
    for i in range(params["n"]):
        image, masks = _synthetic_image(rng, params["size_range"], k)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if kind == "objects":
            stem = f"{i:04d}"
            _imwrite(root / stem / "images" / f"{stem}.png", bgr)
            for j, mask in enumerate(masks):
                _imwrite(root / stem / "masks" / f"{j:03d}.png", mask)
        elif kind == "instance_map":
            labels = np.zeros(masks[0].shape, np.uint16)
            for j, mask in enumerate(masks):
                labels[mask > 0] = j + 1
            _imwrite(root / image_dir / f"{i:04d}.png", bgr)
            _imwrite(root / mask_dir / f"{i:04d}.png", labels)
        else:
            _imwrite(root / image_dir / f"{i:04d}.png", bgr)
            _imwrite(root / mask_dir / f"{i:04d}.png", np.max(masks, 0))
    (root / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")


def _reusable(root: Path, params: dict) -> bool:
    """True if root holds this exact synthetic dataset, False if absent or empty; else DataError."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    marker = root / MARKER
    if not marker.is_file():
        raise DataError(f"{root} exists and is not empty, and was not made by "
                        "make_synthetic_dataset (no .synthetic marker); not touching it")
    made = json.loads(marker.read_text())
    if made != params:
        raise DataError(f"{root} holds a synthetic dataset made with {made}, not {params}; "
                        "delete it or use another folder")
    return True


def make_synthetic_dataset(root, n: int = 40, size_range=(160, 320), seed: int = 0, layout: str = "images",
                           kind: str = "folder", objects: int = 1) -> Path:
    """Write (or reuse) a deterministic dataset of n images with `objects` objects each; returns root.

    layout "images" gives images/ + labels/, "image" gives image/ + mask/ (folder, instance_map).
    Image sides are drawn from size_range (pixels, inclusive). Built in a temporary folder and
    renamed into place, so concurrent callers (several DDP ranks) and interrupted runs never leave
    a half-written root.
    """
    if layout not in ("images", "image"):
        raise ValueError(f"layout must be 'images' or 'image', got {layout!r}")
    if kind not in KINDS or objects < 1:
        raise ValueError(f"kind must be one of {KINDS} and objects >= 1, got {kind!r}, {objects}")
    root = Path(root)
    params = {"n": n, "size_range": [int(v) for v in size_range], "seed": seed, "layout": layout}
    if (kind, objects) != ("folder", 1):
        params.update(kind=kind, objects=objects)
    if _reusable(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write_synthetic(tmp / "data", params)
        if root.exists():
            root.rmdir()  # empty (checked above); fails if another caller filled it meanwhile
        os.rename(tmp / "data", root)
    except OSError:
        if not _reusable(root, params):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
