"""Tiled training data: each large image becomes the tiles of utils.tiles' grid, one Record each.

The encoder sees an image at --image_size pixels on its longest side, so small objects of a large
image shrink below what the decoder can outline. With --tile S --tile_overlap O every image larger
than S is cut into the fixed grid that tiled inference uses (utils.tiles.tile_grid: one owner of
the grid), and each tile is a Record of its own: the Dataset, the embedding cache (the tile's
rectangle is part of the key), the samplers, DDP and resume see tiles as images. Tiling happens
after the formats have loaded, so every format tiles alike.

Which objects a tile trains (assign): each object is trained exactly once, in the tile that holds
the largest part of it (among equals, the one whose inner sides are furthest from its box, as
tiled inference picks the tile for a prompt), when that part is at least min_visible of its area;
its prompt and target are then that visible part. An object wholly inside a tile is such a part
(all of it). In every other tile where only part of it is visible, that part is a fragment:
neither target nor background, it is left out of the loss (TileRecord.ignore_mask), so the model
is never taught that part of an object is a whole one. An object whose largest part is smaller
than min_visible is trained nowhere and is a fragment in every tile it touches. A whole copy of
an object that is trained in another tile (in the overlap) stays ordinary pixels: it is not cut.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..tiles import Rect, margin, tile_grid
from .checks import DataError
from .records import Record, pick, stack_masks

MASK_BYTES = 1 << 26  # bytes of full-size masks decoded at once (bounds memory for large images)


@dataclass(frozen=True)
class TileRecord(Record):
    """One tile of `inner`: its pixels inside rect, the objects trained there (indices into
    inner's objects) and the fragments left out of the loss. size is the tile's (H, W); image
    and source are inner's, so every message names the file."""

    inner: Optional[Record] = None
    rect: Rect = (0, 0, 0, 0)  # (x0, y0, x1, y1) in pixels of inner's image
    objects: Tuple[int, ...] = ()
    fragments: Tuple[int, ...] = ()

    def load_image(self) -> np.ndarray:
        x0, y0, x1, y1 = self.rect
        return np.ascontiguousarray(self.inner.load_image()[y0:y1, x0:x1])

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = [self.objects[i] for i in pick(indices, len(self.objects))]
        return stack_masks(list(self._cropped(chosen)), self.size)

    def ignore_mask(self) -> Optional[np.ndarray]:
        """uint8 (H, W) in {0, 1}: the union of the fragments' visible parts; None without fragments."""
        if not self.fragments:
            return None
        union = np.zeros(self.size, np.uint8)
        for mask in self._cropped(self.fragments):
            union |= mask
        return union

    @property
    def plane(self) -> Optional[int]:
        return self.inner.plane

    def cache_parts(self) -> Dict:
        return dict(self.inner.cache_parts(), tile=list(self.rect))

    def describe(self) -> str:
        x0, y0, x1, y1 = self.rect
        return f"{self.inner.describe()} tile x {x0}:{x1}, y {y0}:{y1}"

    def _cropped(self, indices: Sequence[int]):
        """inner's masks at indices cropped to the tile: from its label map read once, or decoded
        a bounded number at a time."""
        x0, y0, x1, y1 = self.rect
        labelled = last_label_map(self.inner) if indices else None
        if labelled is not None:
            labels, values = labelled
            crop = labels[y0:y1, x0:x1]
            for i in indices:
                yield (crop == values[i]).astype(np.uint8)
            return
        step = max(1, MASK_BYTES // max(1, self.inner.size[0] * self.inner.size[1]))
        for start in range(0, len(indices), step):
            for mask in self.inner.load_masks(list(indices[start : start + step])):
                yield np.ascontiguousarray(mask[y0:y1, x0:x1] != 0, dtype=np.uint8)


_LAST: list = []  # [(record, its label map)]: the one most recently read in this process


def last_label_map(record: Record):
    """record.label_map(), kept for the next call: a tile's objects, its fragments and the chunks
    of a validation tile read one label map (the whole image's) once, not once per call."""
    if not (_LAST and _LAST[0][0] == record):
        _LAST[:] = [(record, record.label_map())]
    return _LAST[0][1]


def measure(record: Record, rects: Sequence[Rect]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(area (N,), visible area per tile (N, T), box (N, 4) xyxy, x1 and y1 exclusive) of every
    object of record: from its label map in one pass, or its masks decoded a bounded number at a time."""
    n = record.num_objects
    area, visible, boxes = np.zeros(n, np.int64), np.zeros((n, len(rects)), np.int64), np.zeros((n, 4), np.int64)
    labelled = record.label_map() if n else None
    if labelled is not None:
        labels, values = labelled
        index = {int(v): i for i, v in enumerate(values)}
        ys, xs = np.nonzero(labels)
        found, inverse = np.unique(labels[ys, xs], return_inverse=True)
        which = np.array([index.get(int(v), -1) for v in found], np.int64)[inverse.reshape(-1)]
        ys, xs, which = ys[which >= 0], xs[which >= 0], which[which >= 0]  # values not kept are background
        area[:] = np.bincount(which, minlength=n)
        for t, (x0, y0, x1, y1) in enumerate(rects):
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            visible[:, t] = np.bincount(which[inside], minlength=n)
        big = np.iinfo(np.int64).max
        boxes[:, :2] = big
        np.minimum.at(boxes[:, 0], which, xs)
        np.minimum.at(boxes[:, 1], which, ys)
        np.maximum.at(boxes[:, 2], which, xs + 1)
        np.maximum.at(boxes[:, 3], which, ys + 1)
        boxes[area == 0] = 0
        return area, visible, boxes
    step = max(1, MASK_BYTES // max(1, record.size[0] * record.size[1]))
    for start in range(0, n, step):
        for j, mask in enumerate(record.load_masks(list(range(start, min(n, start + step))))):
            o = start + j
            ys, xs = np.nonzero(mask)
            if not len(ys):
                continue
            area[o] = len(ys)
            boxes[o] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            for t, (x0, y0, x1, y1) in enumerate(rects):
                visible[o, t] = np.count_nonzero((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
    return area, visible, boxes


def assign(area: np.ndarray, visible: np.ndarray, boxes: np.ndarray, rects: Sequence[Rect], size: Tuple[int, int],
           min_visible: float) -> List[Tuple[List[int], List[int]]]:
    """Per tile, (objects trained there, fragments left out of its loss); see the module's
    docstring for the rule. area (N,), visible (N, T), boxes (N, 4), size (H, W) of the image."""
    out: List[Tuple[List[int], List[int]]] = [([], []) for _ in rects]
    for o in range(len(area)):
        if area[o] == 0:
            continue
        most = visible[o].max()
        owner = None
        if most >= min_visible * area[o]:
            candidates = [t for t in range(len(rects)) if visible[o, t] == most]
            owner = max(candidates, key=lambda t: margin(rects[t], boxes[o], size))  # first of equals
        for t in range(len(rects)):
            if t == owner:
                out[t][0].append(o)
            elif 0 < visible[o, t] < area[o]:
                out[t][1].append(o)
    return out


@dataclass
class TileCounts:
    """What tiling did to one split, for the start-up log."""

    images: int = 0
    tiled_images: int = 0
    tiles: List[int] = None  # tiles kept per image
    objects: List[int] = None  # trained objects per kept tile
    whole: int = 0
    cut: int = 0
    untrained: int = 0
    fragments: int = 0
    empty_tiles: int = 0

    def __post_init__(self) -> None:
        self.tiles, self.objects = [], []

    def line(self, split: str) -> str:
        if not self.images:
            return f"{split}: no images"
        t, o = np.array(self.tiles), np.array(self.objects or [0])
        return (f"{split}: {self.images} images ({self.tiled_images} larger than a tile) -> {t.sum()} tiles, "
                f"{t.min()}-{t.max()} per image (mean {t.mean():.1f}); {self.empty_tiles} tile(s) without an object "
                f"to train left out; objects per tile {o.min()}-{o.max()} (mean {o.mean():.1f}): {self.whole} whole, "
                f"{self.cut} cut (their visible part), {self.untrained} never trained (no part large enough), "
                f"{self.fragments} fragment(s) left out of the loss")


def tile_records(records: Sequence[Record], tile: int, overlap: int, min_visible: float
                 ) -> Tuple[List[Record], TileCounts]:
    """Each record larger than tile on a side replaced by its tiles that train at least one object
    (in grid order); smaller records kept as they are. Returns the records and their counts."""
    out: List[Record] = []
    counts = TileCounts()
    for record in records:
        counts.images += 1
        h, w = record.size
        rects = tile_grid(h, w, tile, overlap)
        if len(rects) == 1:
            out.append(record)
            counts.tiles.append(1)
            counts.objects.append(record.num_objects)
            counts.whole += record.num_objects
            continue
        counts.tiled_images += 1
        area, visible, boxes = measure(record, rects)
        kept = 0
        for t, (trained, fragments) in enumerate(assign(area, visible, boxes, rects, (h, w), min_visible)):
            counts.fragments += len(fragments)
            if not trained:
                counts.empty_tiles += 1
                continue
            x0, y0, x1, y1 = rects[t]
            out.append(TileRecord(record.image, (y1 - y0, x1 - x0), record.source,
                                  tuple(record.categories[o] for o in trained), record, rects[t], tuple(trained),
                                  tuple(fragments)))
            kept += 1
            counts.objects.append(len(trained))
            whole = int(sum(visible[o, t] == area[o] for o in trained))
            counts.whole += whole
            counts.cut += len(trained) - whole
        counts.untrained += int(((area > 0) & (visible.max(1) < min_visible * area)).sum())
        counts.tiles.append(kept)
    return out, counts


def tile_data(data, tile: int, overlap: int, min_visible: float):
    """RunData with its training and validation records tiled, and the start-up lines."""
    train, train_counts = tile_records(data.train, tile, overlap, min_visible)
    val, val_counts = tile_records(data.val, tile, overlap, min_visible)
    if not train:
        raise DataError(f"--tile {tile}: no tile of the training images holds an object to train "
                        f"(each is cut into parts smaller than --tile_min_visible {min_visible:g})")
    head = f"tiles of {tile} px, overlap {overlap}, an object cut by a border trains where at least {min_visible:g} of it is"
    return replace(data, train=train, val=val,
                   notes=list(data.notes) + [head, train_counts.line("  train"), val_counts.line("  validation")])
