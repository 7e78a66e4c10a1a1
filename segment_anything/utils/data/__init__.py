"""Binary-mask segmentation data: pairing, strict loading, box prompts and a Dataset.

Every check runs in `find_pairs` / `check_dataset`, before training starts, so that a bad file
stops the run with a message naming it instead of killing one DDP rank in the middle of an epoch.
"""

import json
import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..transforms import ResizeLongestSide

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LOSSY = frozenset({".jpg", ".jpeg"})
LAYOUTS = (("images", "labels"), ("image", "mask"))  # (image folder, mask folder)
MARKER = ".synthetic"


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it."""


@dataclass(frozen=True, order=True)
class Pair:
    image: Path
    mask: Path


@dataclass
class CheckReport:
    n_pairs: int  # pairs checked
    n_empty: int = 0  # pairs skipped because the mask has no foreground
    empty: list[Path] = field(default_factory=list)  # their mask files

    @property
    def n_valid(self) -> int:
        return self.n_pairs - self.n_empty


def _layout_help(root: Path) -> str:
    names = " or ".join(f"{root}/{i}/ + {root}/{m}/" for i, m in LAYOUTS)
    return f"expected {names} with files matched by name ({', '.join(sorted(EXTENSIONS))})"


def _by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in EXTENSIONS:
            continue
        if path.stem in files:
            raise DataError(f"{files[path.stem]} and {path} have the same name in one folder; "
                            "cannot tell which one to pair")
        files[path.stem] = path
    return files


def _unpaired(files: dict[str, Path], others: dict[str, Path], what: str) -> list[str]:
    return [f"{what} without a partner: {files[s]}" for s in sorted(files.keys() - others.keys())]


def find_pairs(root: str | Path) -> list[Pair]:
    """Pair every image with its mask by file stem, for the layouts in `LAYOUTS`.

    Returns the pairs sorted by image path. Raises DataError for an unknown or ambiguous layout, no
    files, two files with one stem in a folder, or any file without a partner.
    """
    root = Path(root)
    found = [(root / i, root / m) for i, m in LAYOUTS if (root / i).is_dir() and (root / m).is_dir()]
    if len(found) != 1:
        what = "both layouts" if found else "no known layout"
        raise DataError(f"{root}: {what}; {_layout_help(root)}")
    image_dir, mask_dir = found[0]
    images, masks = _by_stem(image_dir), _by_stem(mask_dir)
    if not images and not masks:
        raise DataError(f"{root}: no image or mask files; {_layout_help(root)}")
    problems = _unpaired(images, masks, "image") + _unpaired(masks, images, "mask")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError("; ".join(problems[:10]) + more)
    return sorted(Pair(images[s], masks[s]) for s in images)


def _imread(path: Path, flags: int) -> np.ndarray:
    try:
        array = cv2.imread(str(path), flags)
    except cv2.error as err:
        raise DataError(f"{path}: cannot read image ({err})") from err
    if array is None:
        raise DataError(f"{path}: cannot read image (missing, unreadable or not an image)")
    return array


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB, shape (H, W, 3); grey and 16-bit files are converted."""
    return cv2.cvtColor(_imread(Path(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def load_mask(path: str | Path, threshold: int = 127) -> np.ndarray:
    """Read a binary mask as uint8 (H, W) in {0, 1}; colour masks are converted to grey first.

    Lossless files must hold only {0, 1} or only {0, 255}: any other value means the file is not a
    binary mask (a label map, an anti-aliased drawing), and guessing would train on wrong targets.
    JPEG files always carry compression noise, so they are thresholded: value > threshold -> 1.
    """
    path = Path(path)
    # ANYDEPTH keeps 16-bit masks as they are: cv2 would otherwise scale 1 down to 0.
    mask = _imread(path, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if path.suffix.lower() in LOSSY:
        return (mask > threshold).astype(np.uint8)
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 1}:
        return mask.astype(np.uint8)
    bad = values[(values != 0) & (values != 255)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5].tolist()) + (", ..." if bad.size > 5 else "")
        raise DataError(f"{path}: mask is not binary; expected only {{0, 1}} or {{0, 255}}, "
                        f"found {bad.size} other value(s): {shown}")
    return (mask == 255).astype(np.uint8)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Box around the foreground of mask (H, W), as float32 (4,) xyxy in pixels.

    Uses cv2.boundingRect like the reference project: (x, y, w, h) -> (x, y, x + w, y + h), so x1, y1
    are one past the last foreground column/row (pixel-edge coordinates, exclusive end). One box
    covers all foreground, even when it is several separate blobs.
    """
    if not mask.any():
        raise DataError("mask has no foreground pixels; cannot make a box")
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask != 0, dtype=np.uint8))
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def _check_pair(pair: Pair, threshold: int) -> bool:
    """Load both files once; True when the mask has foreground."""
    image, mask = load_image(pair.image), load_mask(pair.mask, threshold)
    if image.shape[:2] != mask.shape:
        raise DataError(f"size mismatch: image {pair.image} is {image.shape[1]}x{image.shape[0]}, "
                        f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} (WxH)")
    return bool(mask.any())


def check_dataset(pairs: list[Pair], threshold: int = 127,
                  workers: int | None = None) -> tuple[list[Pair], CheckReport]:
    """Read every pair once and return (pairs with a non-empty mask, report).

    Unreadable files, non-binary masks and size mismatches are collected over the whole dataset and
    raised as one DataError, so one run shows every broken file. Empty masks give no box prompt, so
    those pairs are skipped and listed in the report.
    """
    workers = workers or min(8, os.cpu_count() or 1)

    def run(pair: Pair) -> bool | DataError:
        try:
            return _check_pair(pair, threshold)
        except DataError as err:
            return err

    # Threads suffice: cv2 decodes with the GIL released.
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, pairs))
    errors = [str(r) for r in results if isinstance(r, DataError)]
    if errors:
        more = f"\n(and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad pair(s):\n" + "\n".join(errors[:20]) + more)
    valid = [p for p, ok in zip(pairs, results) if ok]
    empty = [p.mask for p, ok in zip(pairs, results) if not ok]
    if pairs and not valid:
        raise DataError(f"all {len(pairs)} masks are empty (e.g. {empty[0]}); nothing to train on")
    return valid, CheckReport(n_pairs=len(pairs), n_empty=len(empty), empty=empty)


def split_pairs(pairs: list[Pair], val_fraction: float = 0.2,
                seed: int = 21) -> tuple[list[Pair], list[Pair]]:
    """Seeded split into (train, val), each sorted; both non-empty. Independent of input order."""
    if len(pairs) < 2:
        raise DataError(f"need at least 2 pairs to split into train and val, got {len(pairs)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    shuffled = sorted(pairs)
    random.Random(seed).shuffle(shuffled)
    n_val = min(max(round(len(shuffled) * val_fraction), 1), len(shuffled) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


class MaskDataset(Dataset):
    """One item per (image, binary mask) pair; run `check_dataset` on the pairs first.

    Item keys:
      image          uint8 (3, h, w): RGB resized so the longest side is image_size (not padded)
      original_size  (H, W) of the file
      input_size     (h, w) after resizing
      masks          uint8 (N, H, W) in {0, 1} at original size; N = 1 for this format
      boxes          float32 (N, 4) xyxy in original pixels, from `mask_to_box`
      path           the image path
    """

    def __init__(self, pairs: list[Pair], image_size: int, threshold: int = 127):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.pairs, self.image_size, self.threshold = list(pairs), image_size, threshold
        self.transform = ResizeLongestSide(image_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        image, mask = load_image(pair.image), load_mask(pair.mask, self.threshold)
        # The predictor's own resize, so fine-tuning inputs are exactly what inference sees.
        resized = self.transform.apply_image(image)
        h, w = resized.shape[:2]
        masks = mask[None]
        try:
            boxes = np.stack([mask_to_box(m) for m in masks])
        except DataError as err:
            raise DataError(f"{pair.mask}: {err}") from err
        return {
            "image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "original_size": (int(image.shape[0]), int(image.shape[1])),
            "input_size": (h, w),
            "masks": torch.from_numpy(masks),
            "boxes": torch.from_numpy(boxes),
            "path": str(pair.image),
        }


def collate(batch: list[dict]) -> list[dict]:
    """Keep items as a list: sizes differ, and the trainer pads and stacks on its side."""
    return list(batch)


def _texture(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1], float32 (h, w); cells sets how coarse it is."""
    small = rng.random((max(h // cells, 2), max(w // cells, 2)), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _object_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 (h, w) {0, 255}: one filled ellipse or star-shaped polygon, well inside the image."""
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


def _synthetic_pair(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple:
    """(RGB uint8 (H, W, 3), mask uint8 (H, W) {0, 255}) with a clearly distinct object."""
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    mask = _object_mask(rng, h, w)
    # Muted, blotchy background; saturated, finely striped object: distinct in colour and texture.
    grey = 60 + 120 * _texture(rng, h, w, 24) + 25 * _texture(rng, h, w, 4)
    background = np.repeat(grey[..., None], 3, 2) * rng.uniform(0.85, 1.0, 3)
    colour = np.zeros(3)
    colour[rng.permutation(3)[:2]] = (255, rng.uniform(0, 120))
    yy, xx = np.mgrid[:h, :w]
    stripes = 0.8 + 0.2 * np.sin((xx + yy) * rng.uniform(0.4, 0.8))
    obj = colour * stripes[..., None]
    image = np.where(mask[..., None] > 0, obj, background).clip(0, 255).astype(np.uint8)
    return image, mask


def _write_synthetic(root: Path, params: dict) -> None:
    image_dir, mask_dir = next((i, m) for i, m in LAYOUTS if i == params["layout"])
    (root / image_dir).mkdir(parents=True)
    (root / mask_dir).mkdir()
    rng = np.random.default_rng(params["seed"])
    for k in range(params["n"]):
        image, mask = _synthetic_pair(rng, params["size_range"])
        cv2.imwrite(str(root / image_dir / f"{k:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / mask_dir / f"{k:04d}.png"), mask)
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


def make_synthetic_dataset(root: str | Path, n: int = 40, size_range: tuple[int, int] = (160, 320),
                           seed: int = 0, layout: str = "images") -> Path:
    """Write (or reuse) a deterministic binary-mask dataset of n PNG pairs; returns root.

    layout "images" gives images/ + labels/, "image" gives image/ + mask/. Image sides are drawn from
    size_range (pixels, inclusive). Each image has one distinct object on a textured background, so
    SAM's mask decoder can learn it from a box. Built in a temporary folder and renamed into place,
    so concurrent callers (several DDP ranks) and interrupted runs never leave a half-written root.
    """
    if layout not in ("images", "image"):
        raise ValueError(f"layout must be 'images' or 'image', got {layout!r}")
    root = Path(root)
    params = {"n": n, "size_range": [int(v) for v in size_range], "seed": seed, "layout": layout}
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
