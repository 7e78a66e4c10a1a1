"""TiledMaskGenerator: SamAutomaticMaskGenerator run tile by tile on a large image, duplicates merged.

Each tile (utils/tiles.py) goes through the ordinary generator as an image of its own, so memory
is that of one tile; masks are kept cropped to their boxes in the original frame. Objects in the
overlap of two tiles come out twice, and objects cut by a tile border come out as fragments;
they are merged in two steps:

1. box NMS in the original frame among the masks not cut by an inner tile border (by predicted
   IoU), and a fragment whose box matches a whole mask's is dropped (the object's other view); two
   fragments never suppress each other by box, as they may be the two halves of one object;
2. masks cut by a border are compared with the masks of neighbouring tiles inside the tiles'
   shared strip, where both saw the same pixels: a mask IoU there above `merge_iou` makes them one
   object, whose mask is the union.

The records are those of SamAutomaticMaskGenerator, in original-image pixels; `crop_box` is the
tile of the record's largest part.
"""

from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from .automatic_mask_generator import OUTPUT_MODES, SamAutomaticMaskGenerator
from .modeling import Sam
from .utils import amg
from .utils.tiles import Rect, intersect, tile_grid


@dataclass
class Piece:
    """One mask, cropped to its box: pixels (h, w) bool placed at (x0, y0) of the original image."""

    x0: int
    y0: int
    pixels: np.ndarray
    tile: Rect
    cut: bool  # touches an inner border of its tile: the object may continue in the next tile
    record: Dict[str, Any]  # the generator's record (scalars, in original pixels)

    @property
    def rect(self) -> Rect:
        return self.x0, self.y0, self.x0 + self.pixels.shape[1], self.y0 + self.pixels.shape[0]

    def window(self, rect: Rect) -> np.ndarray:
        """The mask over rect (original pixels), zeros where the piece does not reach."""
        out = np.zeros((rect[3] - rect[1], rect[2] - rect[0]), bool)
        common = intersect(self.rect, rect)
        if common is not None:
            cx0, cy0, cx1, cy1 = common
            out[cy0 - rect[1]:cy1 - rect[1], cx0 - rect[0]:cx1 - rect[0]] = \
                self.pixels[cy0 - self.y0:cy1 - self.y0, cx0 - self.x0:cx1 - self.x0]
        return out


def union(pieces: List[Piece]) -> Piece:
    """One piece covering all of them; the scalars of the largest."""
    if len(pieces) == 1:
        return pieces[0]
    x0, y0 = min(p.rect[0] for p in pieces), min(p.rect[1] for p in pieces)
    x1, y1 = max(p.rect[2] for p in pieces), max(p.rect[3] for p in pieces)
    pixels = np.zeros((y1 - y0, x1 - x0), bool)
    for p in pieces:
        pixels |= p.window((x0, y0, x1, y1))
    main = max(pieces, key=lambda p: int(p.pixels.sum()))
    return Piece(x0, y0, pixels, main.tile, all(p.cut for p in pieces), main.record)


def full_rle(piece: Piece, height: int, width: int) -> Dict[str, Any]:
    """Uncompressed RLE of the piece in the full frame, without allocating the full frame."""
    x0, x1 = piece.rect[0], piece.rect[2]
    columns = np.zeros((height, x1 - x0), bool)
    columns[piece.y0:piece.y0 + piece.pixels.shape[0]] = piece.pixels
    rle = amg.mask_to_rle_pytorch(torch.from_numpy(columns)[None])[0]
    counts = list(rle["counts"])
    counts[0] += x0 * height  # the columns left of the piece: background
    tail = (width - x1) * height  # and right of it
    if len(counts) % 2:  # ends on background: extend that run
        counts[-1] += tail
    elif tail:
        counts.append(tail)
    return {"size": [height, width], "counts": counts}


class TiledMaskGenerator:
    def __init__(self, model: Sam, tile: int = 1024, overlap: int = 128, merge_iou: float = 0.5,
                 output_mode: str = "binary_mask", **generator_args: Any) -> None:
        """tile, overlap: the grid in original pixels; merge_iou: mask IoU inside two tiles' shared
        strip above which two masks are one object; other arguments as SamAutomaticMaskGenerator
        (per tile; output_mode applies to the merged records: binary_mask gives full-size arrays,
        the RLE modes never allocate the full frame)."""
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        tile_grid(1, 1, tile, overlap)  # checks the two numbers
        self.tile, self.overlap, self.merge_iou, self.output_mode = tile, overlap, merge_iou, output_mode
        self.generator = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **generator_args)

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"generate expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        pieces = []
        for rect in tile_grid(h, w, self.tile, self.overlap):
            x0, y0, x1, y1 = rect
            pieces += self.tile_pieces(self.generator.generate(np.ascontiguousarray(image[y0:y1, x0:x1])), rect, (h, w))
        return [self._record(p, h, w) for p in self.merge(pieces)]

    @staticmethod
    def tile_pieces(records: List[Dict[str, Any]], rect: Rect, size) -> List[Piece]:
        """The generator's records of one tile as pieces in the original frame."""
        x0, y0 = rect[:2]
        out = []
        for r in records:
            mask = np.asarray(r["segmentation"], bool)
            ys, xs = np.nonzero(mask)
            if not len(ys):
                continue
            bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            box = torch.tensor([[bx0, by0, bx1 - 1, by1 - 1]], dtype=torch.float)
            cut = bool(amg.is_box_near_crop_edge(box, list(rect), [0, 0, size[1], size[0]])[0])
            record = {k: v for k, v in r.items() if k != "segmentation"}
            record["point_coords"] = [[p[0] + x0, p[1] + y0] for p in r["point_coords"]]
            record["crop_box"] = [x0, y0, rect[2] - x0, rect[3] - y0]
            out.append(Piece(bx0 + x0, by0 + y0, mask[by0:by1, bx0:bx1].copy(), rect, cut, record))
        return out

    def merge(self, pieces: List[Piece]) -> List[Piece]:
        """Box NMS in the original frame (see the module docstring), then fragments joined with the
        masks they match inside the strip their two tiles share."""
        whole = [p for p in pieces if not p.cut]
        cut = [p for p in pieces if p.cut]
        thresh = self.generator.box_nms_thresh
        if whole:
            boxes = torch.tensor([p.rect for p in whole], dtype=torch.float)
            scores = torch.tensor([p.record["predicted_iou"] for p in whole], dtype=torch.float)
            whole = [whole[i] for i in batched_nms(boxes, scores, torch.zeros(len(whole)), thresh).tolist()]
        if whole and cut:  # a fragment with the box of a whole mask is that object's other view
            overlaps = box_iou(torch.tensor([p.rect for p in cut], dtype=torch.float),
                               torch.tensor([p.rect for p in whole], dtype=torch.float))
            cut = [p for p, o in zip(cut, overlaps.max(1).values.tolist()) if o <= thresh]
        # Two fragments never suppress each other by their boxes: they may be halves of one object.
        pieces = whole + cut
        if not pieces:
            return []
        parent = list(range(len(pieces)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        rects = np.array([p.rect for p in pieces])
        for i, a in enumerate(pieces):
            if not a.cut:
                continue  # a whole mask joins only with fragments, which look for it themselves
            near = ((rects[:, 0] < a.rect[2]) & (rects[:, 2] > a.rect[0]) & (rects[:, 1] < a.rect[3])
                    & (rects[:, 3] > a.rect[1]))
            for j in np.flatnonzero(near).tolist():
                b = pieces[j]
                if j == i or a.tile == b.tile:
                    continue
                both = (min(a.rect[0], b.rect[0]), min(a.rect[1], b.rect[1]), max(a.rect[2], b.rect[2]),
                        max(a.rect[3], b.rect[3]))
                strip = intersect(a.tile, b.tile)
                strip = strip and intersect(strip, both)
                if strip is None:
                    continue
                ma, mb = a.window(strip), b.window(strip)
                overlap = np.logical_and(ma, mb).sum()
                if overlap and overlap / np.logical_or(ma, mb).sum() > self.merge_iou:
                    parent[root(j)] = root(i)
        groups: Dict[int, List[Piece]] = {}
        for i, p in enumerate(pieces):
            groups.setdefault(root(i), []).append(p)
        return [union(g) for g in groups.values()]

    def _record(self, piece: Piece, h: int, w: int) -> Dict[str, Any]:
        rle = full_rle(piece, h, w)
        if self.output_mode == "binary_mask":
            segmentation = piece.window((0, 0, w, h))
        elif self.output_mode == "coco_rle":
            segmentation = amg.coco_encode_rle(rle)
        else:
            segmentation = rle
        x0, y0, x1, y1 = piece.rect
        return dict(piece.record, segmentation=segmentation, area=int(piece.pixels.sum()),
                    bbox=[x0, y0, x1 - 1 - x0, y1 - 1 - y0])
