"""Overlapping tiles of a large image, and the tile that holds a prompt with the most room.

SAM sees an image at --image_size pixels on its longest side; a 6000x4000 slide shrinks six
times and a 12-pixel nucleus becomes two. Tiling cuts the image into a fixed grid of S x S
windows that overlap by O pixels (the last row and column aligned to the image edge, so every
tile is full-size when the image is larger than S), each seen by the encoder at full resolution.
An object no wider than O lies wholly inside at least one tile. Rectangles are (x0, y0, x1, y1)
in pixels of the original image, x1 and y1 exclusive.
"""

from typing import List, Optional, Sequence, Tuple

Rect = Tuple[int, int, int, int]


def check_tiling(tile: int, overlap: int) -> None:
    if tile < 16:
        raise ValueError(f"--tile must be at least 16 pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"--tile_overlap must be in [0, --tile), got {overlap} with --tile {tile}")


def starts(length: int, tile: int, overlap: int) -> List[int]:
    """Tile origins along one axis: every tile - overlap pixels, the last one ending at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    out = list(range(0, length - tile, stride))
    return out + [length - tile]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> List[Rect]:
    """The grid's rectangles, row by row; one rectangle (the whole image) when it fits in a tile."""
    check_tiling(tile, overlap)
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in starts(height, tile, overlap) for x in starts(width, tile, overlap)]


def extent(box: Optional[Sequence[float]] = None, points: Optional[Sequence[Sequence[float]]] = None) -> Tuple[float, ...]:
    """(x0, y0, x1, y1) around a box and points (all of them: background points shape the mask too)."""
    xs, ys = [], []
    if box is not None:
        xs += [float(box[0]), float(box[2])]
        ys += [float(box[1]), float(box[3])]
    for x, y in points if points is not None else ():
        xs.append(float(x))
        ys.append(float(y))
    if not xs:
        raise ValueError("a prompt needs a box or points")
    return min(xs), min(ys), max(xs), max(ys)


def margin(rect: Rect, span: Sequence[float], size: Tuple[int, int]) -> float:
    """Distance from span to the nearest side of rect that is inside the image (a side on the
    image border costs nothing: the object cannot continue there); negative when span leaves rect."""
    x0, y0, x1, y1 = rect
    h, w = size
    inf = float("inf")
    sides = (span[0] - x0 if x0 > 0 else (inf if span[0] >= 0 else -1.0),
             span[1] - y0 if y0 > 0 else (inf if span[1] >= 0 else -1.0),
             x1 - span[2] if x1 < w else (inf if span[2] <= w else -1.0),
             y1 - span[3] if y1 < h else (inf if span[3] <= h else -1.0))
    return min(sides)


def best_tile(rects: Sequence[Rect], span: Sequence[float], size: Tuple[int, int]) -> Optional[int]:
    """Index of the rectangle that contains span with the most margin (the first of equals), or
    None when none contains it."""
    scores = [margin(r, span, size) for r in rects]
    best = max(range(len(rects)), key=lambda i: scores[i])
    return best if scores[best] >= 0 else None


def window_around(span: Sequence[float], tile: int, size: Tuple[int, int]) -> Rect:
    """A tile-sized rectangle centred on span, moved inside the image (for a prompt that no tile
    of the grid contains)."""
    h, w = size
    cx, cy = (span[0] + span[2]) / 2, (span[1] + span[3]) / 2
    tw, th = min(tile, w), min(tile, h)
    x0 = int(min(max(round(cx - tw / 2), 0), w - tw))
    y0 = int(min(max(round(cy - th / 2), 0), h - th))
    return x0, y0, x0 + tw, y0 + th


def intersect(a: Sequence[int], b: Sequence[int]) -> Optional[Rect]:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def add_arguments(parser) -> None:
    """--tile and --tile_overlap on a tool's parser."""
    parser.add_argument("--tile", type=int, default=0,
                        help="images larger than this many pixels are cut into overlapping tiles of this side, each "
                             "seen by the encoder at full resolution (0 = off: the whole image resized)")
    parser.add_argument("--tile_overlap", type=int, default=128,
                        help="pixels shared by neighbouring tiles; objects up to this size fit wholly in one tile")


def check_arguments(args) -> None:
    if args.tile:
        check_tiling(args.tile, args.tile_overlap)
    elif args.tile < 0:
        raise ValueError(f"--tile must be 0 (off) or a tile side in pixels, got {args.tile}")
