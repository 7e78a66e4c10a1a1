"""Writes docs/tiled_predict.png: TiledPredictor on the 6000x4000 nuclei mosaic of bench/tiles.py,
each box prompt in the colour of the tile it is decoded in, the tiles outlined in theirs. The
model is vit_t with RANDOM weights (no download): the picture shows where each prompt is decoded,
not what a trained SAM finds.

    python docs/make_tile_pictures.py
"""

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.tiles import build_mosaic  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.tiled_predictor import TiledPredictor  # noqa: E402
from segment_anything.utils.draw import colours, overlay  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from segment_anything.utils.tiles import tile_grid  # noqa: E402

TILE, OVERLAP = 1024, 128
CROP = (512, 512, 2560, 1792)  # x0, y0, x1, y1 of the mosaic shown: two vertical and one horizontal tile border
SIDE = 1200  # width of the written pictures


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
    from PIL import Image

    h, w = picture.shape[:2]
    small = cv2.resize(picture, (SIDE, round(h * SIDE / w)), interpolation=cv2.INTER_AREA)
    Image.fromarray(small).quantize(256).save(path, optimize=True)
    print(f"wrote {path}")


def main() -> None:
    torch.manual_seed(0)
    root = build_mosaic(Path(tempfile.gettempdir()) / "sam_bench_tiles" / "6000x4000", 4000, 6000)
    image = cv2.cvtColor(cv2.imread(str(root / "image" / "mosaic.png")), cv2.COLOR_BGR2RGB)
    labels = cv2.imread(str(root / "mask" / "mosaic.png"), cv2.IMREAD_UNCHANGED)
    sam = randomize_(sam_model_registry["vit_t"](), seed=0).eval()
    predict_picture(image, labels, sam)


def predict_picture(image: np.ndarray, labels: np.ndarray, sam) -> None:
    x0, y0, x1, y1 = CROP
    view = image[y0:y1, x0:x1]
    boxes = []
    for value in np.unique(labels[y0:y1, x0:x1])[1::4]:  # every 4th nucleus wholly inside the view
        ys, xs = np.nonzero(labels[y0:y1, x0:x1] == value)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) + np.array([x0, y0, x0, y0])
        if box[0] > x0 and box[1] > y0 and box[2] < x1 and box[3] < y1:
            boxes.append(box)
    rects = [r for r in tile_grid(*image.shape[:2], TILE, OVERLAP)
             if r[0] < x1 and r[2] > x0 and r[1] < y1 and r[3] > y0]
    palette = colours(len(rects), seed=1)
    predictor = TiledPredictor(sam, TILE, OVERLAP)
    predictor.set_image(image)
    masks, tiles = [], []
    with torch.no_grad():
        for box in boxes:
            mask, _, _ = predictor.predict(box=box, multimask_output=False)
            masks.append(mask[0, y0:y1, x0:x1])
            tiles.append(rects.index(tuple(predictor.last_tile)))
    # Each prompt, and its mask, in the colour of the tile it was decoded in.
    picture = borders(overlay(view, masks, palette[tiles]), rects, CROP, palette)
    for box, k in zip(boxes, tiles):
        bx0, by0, bx1, by1 = (int(v) for v in box - np.array([x0, y0, x0, y0]))
        cv2.rectangle(picture, (bx0 - 4, by0 - 4), (bx1 + 4, by1 + 4), tuple(int(c) for c in palette[k]), 4)
    write(REPO / "docs" / "tiled_predict.png", picture)
    print(f"{len(boxes)} box prompts decoded in {len(set(tiles))} tiles")


if __name__ == "__main__":
    main()
