"""Writes the pictures of docs/tiling.md from the 6000x4000 nuclei mosaic of bench/tiles.py:

- docs/tiled_predict.png: TiledPredictor, each box prompt in the colour of the tile it is decoded
  in, the tiles outlined in theirs;
- docs/tiled_amg.png: TiledMaskGenerator on the same part of the mosaic, above the masks each tile
  found (in the tile's colour, with the tile's grid of point prompts), below the records after the
  merge, those joined across tile borders in white.

The model is vit_t with RANDOM weights (no download): the pictures show where each prompt is
decoded, where each mask comes from and what the merge joins, not what a trained SAM finds. An
untrained decoder's masks do not follow the nuclei at all: it answers every point of a tile with
the whole tile, and with a dotted line along the tile's left edge.

    python docs/make_tile_pictures.py            # both
    python docs/make_tile_pictures.py amg        # or one: predict, amg
"""

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.tiles import build_mosaic  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.tiled_mask_generator import TiledMaskGenerator  # noqa: E402
from segment_anything.tiled_predictor import TiledPredictor  # noqa: E402
from segment_anything.utils.amg import build_point_grid  # noqa: E402
from segment_anything.utils.draw import colours, overlay  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from segment_anything.utils.tiles import tile_grid  # noqa: E402

TILE, OVERLAP = 1024, 128
CROP = (512, 512, 2560, 1792)  # x0, y0, x1, y1 of the mosaic shown: two vertical and one horizontal tile border
SIDE = 1200  # width of the written pictures
# The automatic generator per tile: a sparse point grid and no crop layers keep the run to a minute
# or two on a CPU; the thresholds let an untrained model's masks through (its predicted IoU is
# negative and its logits are too small to be stable).
AMG_ARGS = dict(points_per_side=4, points_per_batch=16, crop_n_layers=0, pred_iou_thresh=-10.0,
                stability_score_thresh=0.0)


def borders(picture: np.ndarray, rects, crop, palette=None) -> np.ndarray:
    """Each tile's outline (white, or the tile's colour of palette); in the overlap strips two
    outlines run side by side."""
    out = picture.copy()
    x0, y0 = crop[:2]
    for k, (rx0, ry0, rx1, ry1) in enumerate(rects):
        colour = (255, 255, 255) if palette is None else tuple(int(c) for c in palette[k])
        cv2.rectangle(out, (rx0 - x0, ry0 - y0), (rx1 - 1 - x0, ry1 - 1 - y0), colour, 5)
    return out


def write(path: Path, picture: np.ndarray) -> None:
    """Scaled to SIDE pixels wide, colours reduced to 256 to keep the file small."""
    h, w = picture.shape[:2]
    small = cv2.resize(picture, (SIDE, round(h * SIDE / w)), interpolation=cv2.INTER_AREA)
    Image.fromarray(small).quantize(256).save(path, optimize=True)
    print(f"wrote {path}")


def main(which=("predict", "amg")) -> None:
    torch.manual_seed(0)
    root = build_mosaic(Path(tempfile.gettempdir()) / "sam_bench_tiles" / "6000x4000", 4000, 6000)
    image = cv2.cvtColor(cv2.imread(str(root / "image" / "mosaic.png")), cv2.COLOR_BGR2RGB)
    labels = cv2.imread(str(root / "mask" / "mosaic.png"), cv2.IMREAD_UNCHANGED)
    sam = randomize_(sam_model_registry["vit_t"](), seed=0).eval()
    if "predict" in which:
        predict_picture(image, labels, sam)
    if "amg" in which:
        amg_picture(image, sam)


def outline(picture: np.ndarray, mask: np.ndarray, colour, width: int) -> None:
    """A band of about width pixels along the mask's edge, drawn over the picture (a mask thinner
    than that, like a 2-pixel line, shows as a solid band)."""
    kernel = np.ones((width, width), np.uint8)
    mask = mask.astype(np.uint8)
    band = (cv2.dilate(mask, kernel) > 0) & ~(cv2.erode(mask, kernel) > 0)
    picture[band] = tuple(int(c) for c in colour)


def within(piece, whole) -> bool:
    """piece's mask lies inside whole's: one of the masks the merge joined into whole."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = piece.rect, whole.rect
    if ax0 < bx0 or ay0 < by0 or ax1 > bx1 or ay1 > by1:
        return False
    return not (piece.window(whole.rect) & ~whole.pixels).any()


def amg_picture(image: np.ndarray, sam) -> None:
    """TiledMaskGenerator on CROP as an image of its own (its own grid of tiles), drawn in two
    panels: the masks of each tile before the merge, and the records after it."""
    x0, y0, x1, y1 = CROP
    view = np.ascontiguousarray(image[y0:y1, x0:x1])
    h, w = view.shape[:2]
    generator = TiledMaskGenerator(sam, TILE, OVERLAP, **AMG_ARGS)
    rects = tile_grid(h, w, TILE, OVERLAP)
    pieces = []
    with torch.no_grad():  # generate(), step by step, to keep each tile's masks for the upper panel
        for rect in rects:
            rx0, ry0, rx1, ry1 = rect
            found = generator.generator.generate(np.ascontiguousarray(view[ry0:ry1, rx0:rx1]))
            pieces += generator.tile_pieces(found, rect, (h, w))
    merged = generator.merge(pieces)
    picture, joined = draw_amg(view, rects, pieces, merged)
    write(REPO / "docs" / "tiled_amg.png", picture)
    print(f"{len(rects)} tiles, {len(pieces)} masks found in the tiles, {len(merged)} records after the merge, "
          f"{joined} of them joined across tile borders")


def label(picture: np.ndarray, text: str, at, colour) -> None:
    """Text with a dark edge, readable on any part of the mosaic."""
    for c, width in (((0, 0, 0), 12), (tuple(int(v) for v in colour), 4)):
        cv2.putText(picture, text, at, cv2.FONT_HERSHEY_SIMPLEX, 2.0, c, width, cv2.LINE_AA)


def draw_amg(view: np.ndarray, rects, pieces, merged):
    """(picture, records joined across borders): above, each tile's outline, point grid and masks in
    its colour, and how many masks it found; below, the records after the merge, each outlined and
    numbered, those joined from several tiles in white, the tile borders in grey."""
    h, w = view.shape[:2]
    palette = colours(len(rects), seed=1)
    before = borders(view, rects, (0, 0), palette)
    for k, (rx0, ry0, rx1, ry1) in enumerate(rects):
        colour = palette[k]
        for piece in [p for p in pieces if p.tile == rects[k]]:
            outline(before, piece.window((0, 0, w, h)), colour, 10)
        for px, py in build_point_grid(AMG_ARGS["points_per_side"]) * np.array([rx1 - rx0, ry1 - ry0]):
            centre = (int(rx0 + px), int(ry0 + py))
            cv2.circle(before, centre, 14, (255, 255, 255), -1)
            cv2.circle(before, centre, 10, tuple(int(c) for c in colour), -1)
        found = sum(p.tile == rects[k] for p in pieces)
        label(before, f"tile {k + 1} (x {rx0}-{rx1}, y {ry0}-{ry1}): {found} masks", (40, 90 + 75 * k), colour)

    after = borders(view, rects, (0, 0), np.full((len(rects), 3), 128))
    joined = 0
    for i, m in enumerate(merged):
        full = m.window((0, 0, w, h))
        tiles = sorted({rects.index(p.tile) + 1 for p in pieces if within(p, m)})
        colour = (255, 255, 255) if len(tiles) > 1 else palette[tiles[0] - 1]
        joined += len(tiles) > 1
        after[full] = (0.7 * after[full] + 0.3 * np.asarray(colour, np.float32)).astype(np.uint8)
        outline(after, full, colour, 14)
        where = "tiles " + ", ".join(map(str, tiles)) if len(tiles) > 1 else f"tile {tiles[0]}"
        label(after, f"record {i + 1} (x {m.rect[0]}-{m.rect[2]}): {where}", (40, 90 + 75 * i), colour)
    gap = np.full((40, w, 3), 255, np.uint8)
    return np.vstack([before, gap, after]), joined


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("predict", "amg"))
