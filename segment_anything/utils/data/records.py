"""The one record type every data format turns into.

A Record is one image and the objects annotated on it. It is small and picklable (it crosses
process boundaries: spawned workers, DataLoader workers); pixels are read only when asked for.
Each format subclasses Record and implements the two loaders; everything downstream (prompts,
augmentation, the Dataset, the embedding cache, evaluation, the prepare tool) uses only this
interface.

Format records keep one descriptor per object in a field `objects` (a component label, a mask
file, a label value, shape indices, an RLE), parallel to `categories`, so `subset` can drop
objects (too small, filtered) without reading pixels again.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from ..image_spec import ImageSpec
from .checks import DataError
from .stacks import plane_name


@dataclass(frozen=True)
class Record:
    image: str  # path of the image file (for labelme with an embedded image: the JSON file)
    size: Tuple[int, int]  # (H, W) of the decoded image, EXIF orientation applied
    source: str  # the annotation file or folder the objects come from (named in messages)
    categories: Tuple[str, ...]  # one entry per object; "object" where the format has no classes
    # How pixels are read: every format's record declares it as a field; a plain class attribute
    # here (no annotation), so it is not a field of this class and does not move theirs.
    image_spec = ImageSpec()

    @property
    def plane(self) -> Optional[int]:
        """The plane of a stack this record is (--plane), None for a 2-D image."""
        return self.image_spec.plane

    @property
    def num_objects(self) -> int:
        return len(self.categories)

    def load_image(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        raise NotImplementedError

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """uint8 (N, H, W) in {0, 1}: the objects at `indices` (default: all), in that order."""
        raise NotImplementedError

    def label_map(self) -> Optional[Tuple[np.ndarray, Sequence[int]]]:
        """(labels (H, W), each object's label value) when the format stores all objects in one
        label image: tiling then reads it once instead of one mask per object; else None."""
        return None

    def ignore_mask(self) -> Optional[np.ndarray]:
        """uint8 (H, W) in {0, 1}: pixels left out of the loss (parts of objects trained elsewhere,
        see data.tiling), or None when every pixel counts."""
        return None

    def cache_parts(self) -> dict:
        """What the embedding cache's key needs besides the file and the run's settings (the plane
        of a stack: with --plane all the run's settings do not say it; a tile's rectangle)."""
        return {} if self.plane is None else {"plane": self.plane}

    @property
    def name(self) -> str:
        """The file, with ' plane k' for a stack's plane: what items and captions carry (no file read)."""
        return str(self.image) if self.plane is None else f"{self.image} plane {self.plane}"

    def describe(self) -> str:
        """The image as messages name it: the file, and the plane of a stack with its index on each
        plane axis ('stack.tif plane 5 (T=1, Z=1)', read from the file's header)."""
        return str(self.image) if self.plane is None else plane_name(str(self.image), self.plane)

    def subset(self, keep: Sequence[int]) -> "Record":
        """The same image with only the objects at `keep` (for records with an `objects` field)."""
        keep = list(keep)
        objects = getattr(self, "objects")
        return dataclasses.replace(self, objects=tuple(objects[i] for i in keep),
                                   categories=tuple(self.categories[i] for i in keep))


def pick(indices: Optional[Sequence[int]], n: int) -> list:
    """indices as a list (default: all n), each checked to be in range."""
    chosen = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise IndexError(f"object indices {bad} out of range for {n} object(s)")
    return chosen


def stack_masks(masks: Sequence[np.ndarray], size: Tuple[int, int]) -> np.ndarray:
    """uint8 (N, H, W) from a list of (H, W) masks; (0, H, W) when the list is empty."""
    if not masks:
        return np.zeros((0, *size), np.uint8)
    return np.stack([np.asarray(m, dtype=np.uint8) for m in masks])


@dataclass(frozen=True)
class MergedRecord(Record):
    """--instance_mode per_image: one object, the union of all objects of `inner`."""

    inner: Optional[Record] = None

    @classmethod
    def of(cls, record: Record) -> "MergedRecord":
        return cls(record.image, record.size, record.source, ("object",), record)

    @property
    def plane(self) -> Optional[int]:
        return self.inner.plane

    def load_image(self) -> np.ndarray:
        return self.inner.load_image()

    def cache_parts(self) -> dict:
        return self.inner.cache_parts()

    def describe(self) -> str:
        return self.inner.describe()

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = pick(indices, 1)
        union = self.inner.load_masks().max(0, initial=0)[None]
        return np.repeat(union, len(chosen), 0)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Box around the foreground of mask (H, W), as float32 (4,) xyxy in pixels.

    cv2.boundingRect as in the reference project: (x, y, w, h) -> (x, y, x + w, y + h), so x1, y1
    are one past the last foreground column/row (pixel-edge coordinates, exclusive end).
    """
    if not mask.any():
        raise DataError("mask has no foreground pixels; cannot make a box")
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask != 0, dtype=np.uint8))
    return np.array([x, y, x + w, y + h], dtype=np.float32)
