"""`folder`: DIR/images/ + DIR/labels/ (or image|img with mask|masks|label|gt), binary masks.

Images and masks are matched by relative path without extension, so nested subfolders
(`images/a/1.jpg` <-> `labels/a/1.png`) pair as users expect. Objects are the 8-connected
components of each mask (--instance_mode per_object) or the whole mask (per_image, which
`finish` applies as the union of the components).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..checks import BadSample, DataError, Problem
from ..image_io import EXTENSIONS, ImageSpec, load_image, load_mask
from ..records import Record, pick, stack_masks
from . import IMAGE_DIRS, MASK_DIRS, DataOptions, Scan, find_dir, finish, size_mismatch


@dataclass(frozen=True, order=True)
class Pair:
    image: Path
    mask: Path


def layout_help(root: Path) -> str:
    return (f"expected {root}/images/ + {root}/labels/ (or image|img with mask|masks|label|gt) "
            "with files matched by name (png, jpg, jpeg, bmp, tif, tiff)")


def _by_key(folder: Path) -> Dict[str, Path]:
    """Image files under folder (recursively, hidden files and folders left out) by relative path
    without extension. os.walk and string keys: a set of 100k images is listed in about a
    second, where pathlib's per-file parsing took many."""
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(parent, folder)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in EXTENSIONS:
                continue
            full = os.path.join(parent, name)
            if os.path.isfile(full):
                found.append((parts + (name,), full))
    files: Dict[str, Path] = {}
    for parts, full in sorted(found):
        key = "/".join(parts[:-1] + (os.path.splitext(parts[-1])[0],))
        if key in files:
            raise DataError(f"{files[key]} and {full} have the same name in one folder; cannot tell which one to pair")
        files[key] = Path(full)
    return files


def find_pairs(root) -> Tuple[List[Pair], List[Problem]]:
    """(pairs sorted by image path, problems: files without a partner).

    Raises DataError for an unknown or ambiguous layout, no files, or two files with one name."""
    root = Path(root)
    image_dir, mask_dir = find_dir(root, IMAGE_DIRS), find_dir(root, MASK_DIRS)
    if image_dir is None or mask_dir is None:
        raise DataError(f"{root}: no known layout; {layout_help(root)}")
    images, masks = _by_key(image_dir), _by_key(mask_dir)
    if not images and not masks:
        raise DataError(f"{root}: no image or mask files; {layout_help(root)}")
    problems = [Problem("unpaired", f"image without a partner: {images[k]} (no {mask_dir}/{k}.*)")
                for k in sorted(images.keys() - masks.keys())]
    problems += [Problem("unpaired", f"mask without a partner: {masks[k]} (no {image_dir}/{k}.*)")
                 for k in sorted(masks.keys() - images.keys())]
    pairs = [Pair(images[k], masks[k]) for k in sorted(images.keys() & masks.keys(), key=lambda k: images[k])]
    return pairs, problems


def components(mask: np.ndarray) -> np.ndarray:
    """int32 (H, W) labels of the 8-connected components of a {0, 1} mask (0 = background)."""
    return cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)[1]


@dataclass(frozen=True)
class FolderRecord(Record):
    mask: str = ""
    objects: Tuple[int, ...] = ()  # component labels of the mask
    threshold: int = 127
    foreground_values: Tuple[int, ...] = ()
    image_spec: ImageSpec = ImageSpec()

    def load_image(self) -> np.ndarray:
        return load_image(self.image, self.image_spec)

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = pick(indices, len(self.objects))
        labels = components(load_mask(self.mask, self.threshold, self.foreground_values, self.image_spec.plane))
        return stack_masks([labels == self.objects[i] for i in chosen], self.size)


def build(pair: Pair, opts: DataOptions):
    image = load_image(pair.image, opts.image_spec)
    mask = load_mask(pair.mask, opts.mask_threshold, opts.foreground_values, opts.image_spec.plane)
    if image.shape[:2] != mask.shape:
        raise size_mismatch(str(pair.image), image, str(pair.mask), mask.shape)
    labels = components(mask)
    n = int(labels.max())
    record = FolderRecord(str(pair.image), image.shape[:2], str(pair.mask), ("object",) * n, str(pair.mask),
                          tuple(range(1, n + 1)), opts.mask_threshold, opts.foreground_values, opts.image_spec)
    masks = np.stack([labels == k for k in range(1, n + 1)]).astype(np.uint8) if n else np.zeros((0, *mask.shape), np.uint8)
    return finish(record, image, masks, opts)


def scan(root, opts: DataOptions) -> Scan:
    pairs, problems = find_pairs(root)
    return Scan("folder", str(root), pairs, lambda p: build(p, opts), problems)


def check_lossless(path: Path) -> None:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise BadSample("lossy label map", f"{path}: a label map must be lossless (PNG or TIFF); JPEG changes the values")
