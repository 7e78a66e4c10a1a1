"""Writes docs/tiled_predict.png and docs/tiled_amg.png: TiledPredictor and TiledMaskGenerator on the
6000x4000 nuclei mosaic of bench/tiles.py, with the tile borders drawn. The model is vit_t with
RANDOM weights (no download): the pictures show where each prompt is decoded and how masks cross
tile borders, not what a trained SAM finds.

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
from segment_anything.tiled_mask_generator import TiledMaskGenerator  # noqa: E402
from segment_anything.tiled_predictor import TiledPredictor  # noqa: E402
from segment_anything.utils.draw import colours, draw_prompt, overlay, save_rgb  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from segment_anything.utils.tiles import tile_grid  # noqa: E402

TILE, OVERLAP = 1024, 128
CROP = (512, 512, 2560, 1792)  # x0, y0, x1, y1 of the mosaic shown: two vertical and one horizontal tile border
SIDE = 1200  # width of the written pictures


def borders(picture: np.ndarray, rects, crop) -> np.ndarray:
    """Each tile's outline (white, the overlap strips where two outlines run side by side)."""
    out = picture.copy()
    x0, y0 = crop[:2]
    for rx0, ry0, rx1, ry1 in rects:
        cv2.rectangle(out, (rx0 - x0, ry0 - y0), (rx1 - 1 - x0, ry1 - 1 - y0), (255, 255, 255), 3)
    return out


def write(path: Path, picture: np.ndarray) -> None:
    h, w = picture.shape[:2]
    save_rgb(path, cv2.resize(picture, (SIDE, round(h * SIDE / w)), interpolation=cv2.INTER_AREA))
    print(f"wrote {path}")


def main() -> None:
    torch.manual_seed(0)
    root = build_mosaic(Path(tempfile.gettempdir()) / "sam_bench_tiles" / "6000x4000", 4000, 6000)
    image = cv2.cvtColor(cv2.imread(str(root / "image" / "mosaic.png")), cv2.COLOR_BGR2RGB)
    labels = cv2.imread(str(root / "mask" / "mosaic.png"), cv2.IMREAD_UNCHANGED)
    sam = randomize_(sam_model_registry["vit_t"](), seed=0).eval()
    x0, y0, x1, y1 = CROP
    view = image[y0:y1, x0:x1]

    # Prompts: the box of every 4th nucleus inside the view, each decoded in its own tile.
    boxes = []
    for value in np.unique(labels[y0:y1, x0:x1])[1::4]:
        ys, xs = np.nonzero(labels[y0:y1, x0:x1] == value)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) + np.array([x0, y0, x0, y0])
        if box[0] > x0 and box[1] > y0 and box[2] < x1 and box[3] < y1:
            boxes.append(box)
    predictor = TiledPredictor(sam, TILE, OVERLAP)
    predictor.set_image(image)
    masks, used = [], set()
    with torch.no_grad():
        for box in boxes:
            mask, _, _ = predictor.predict(box=box, multimask_output=False)
            masks.append(mask[0, y0:y1, x0:x1])
            used.add(predictor.last_tile)
    picture = overlay(view, masks)
    for box in boxes:
        picture = draw_prompt(picture, box - np.array([x0, y0, x0, y0]))
    rects = [r for r in tile_grid(*image.shape[:2], TILE, OVERLAP) if r[0] < x1 and r[2] > x0 and r[1] < y1 and r[3] > y0]
    write(REPO / "docs" / "tiled_predict.png", borders(picture, rects, CROP))
    print(f"{len(boxes)} box prompts decoded in {len(used)} tiles")

    # Automatic masks on the view as an image of its own, its grid drawn; thresholds off (random weights).
    generator = TiledMaskGenerator(sam, TILE, OVERLAP, points_per_side=12, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0, box_nms_thresh=0.5)
    records = generator.generate(np.ascontiguousarray(view))
    records = sorted(records, key=lambda r: -r["area"])
    picture = overlay(view, [r["segmentation"] for r in records], colours(len(records), seed=3), alpha=0.35)
    write(REPO / "docs" / "tiled_amg.png", borders(picture, tile_grid(*view.shape[:2], TILE, OVERLAP), (0, 0)))
    print(f"{len(records)} automatic masks")


if __name__ == "__main__":
    main()
