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
    """An image file and its mask file. The paths are kept as strings (a listing of 100k pairs
    spent seconds building pathlib objects); .image and .mask give them as Paths."""

    image_file: str
    mask_file: str

    @property
    def image(self) -> Path:
        return Path(self.image_file)

    @property
    def mask(self) -> Path:
        return Path(self.mask_file)


def layout_help(root: Path) -> str:
    return (f"expected {root}/images/ + {root}/labels/ (or image|img with mask|masks|label|gt) "
            "with files matched by name (png, jpg, jpeg, bmp, tif, tiff)")


def _by_key(folder: Path) -> Dict[str, str]:
    """Image files under folder (recursively, hidden files and folders left out) by relative path
    without extension, in path order. os.scandir's entries know their type without a stat per
    file, and string keys avoid pathlib's per-file parsing: 100k files list in a fraction of a
    second."""
    found = []
    stack = [(str(folder), ())]
    while stack:
        parent, parts = stack.pop()
        with os.scandir(parent) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir():  # follows links, as os.walk(followlinks=True) did
                    stack.append((entry.path, parts + (name,)))
                elif os.path.splitext(name)[1].lower() in EXTENSIONS and entry.is_file():
                    found.append((parts + (name,), entry.path))
    files: Dict[str, str] = {}
    for parts, full in sorted(found):  # by path components, as pathlib orders paths
        key = "/".join(parts[:-1] + (os.path.splitext(parts[-1])[0],))
        if key in files:
            raise DataError(f"{files[key]} and {full} have the same name in one folder; cannot tell which one to pair")
        files[key] = full
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
    pairs = [Pair(image, masks[k]) for k, image in images.items() if k in masks]  # in image order
    return pairs, problems


def components(mask: np.ndarray) -> Tuple[int, np.ndarray]:
    """(count, int32 (H, W) labels) of the 8-connected components of a {0, 1} mask: labels 1..count
    are the components, 0 the background."""
    found, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    return found - 1, labels


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
        labels = components(load_mask(self.mask, self.threshold, self.foreground_values, self.image_spec.plane))[1]
        return stack_masks([labels == self.objects[i] for i in chosen], self.size)


def build(pair: Pair, opts: DataOptions):
    image = load_image(pair.image_file, opts.image_spec)
    mask = load_mask(pair.mask_file, opts.mask_threshold, opts.foreground_values, opts.image_spec.plane)
    if image.shape[:2] != mask.shape:
        raise size_mismatch(str(pair.image_file), image, str(pair.mask_file), mask.shape)
    n, labels = components(mask)
    record = FolderRecord(str(pair.image_file), image.shape[:2], str(pair.mask_file), ("object",) * n, str(pair.mask_file),
                          tuple(range(1, n + 1)), opts.mask_threshold, opts.foreground_values, opts.image_spec)
    if opts.min_area > 1:
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # one pass, not n full-size masks
    else:  # a component has at least one pixel: nothing to drop, no pass to count them
        areas = np.ones(n, np.int64)
    return finish(record, image, None, opts, areas=areas)


def scan(root, opts: DataOptions) -> Scan:
    pairs, problems = find_pairs(root)
    return Scan("folder", str(root), pairs, lambda p: build(p, opts), problems, pair_files, build)


def pair_files(pair: Pair) -> Tuple[str, Tuple[str, ...]]:
    return pair.image_file, (pair.mask_file,)


def check_lossless(path: Path) -> None:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise BadSample("lossy label map", f"{path}: a label map must be lossless (PNG or TIFF); JPEG changes the values")
