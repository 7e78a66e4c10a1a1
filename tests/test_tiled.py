"""Tiled inference: the grid, TiledPredictor against SamPredictor on the tile alone, the tiled
generator's merging across tile borders, and the memory of a large image (vit_t, random weights)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.tiled_mask_generator import Piece, TiledMaskGenerator, full_rle
from segment_anything.tiled_predictor import TiledPredictor
from segment_anything.utils import amg
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.tiles import best_tile, extent, starts, tile_grid

SIZE = 256  # encoder input: tiles are resized to it


@pytest.fixture(scope="module")
def sam():
    return randomize_(sam_model_registry["vit_t"](image_size=SIZE), seed=0).eval()


@pytest.fixture(scope="module")
def photo():
    """A 700 x 1100 picture with structure (smooth gradients and a few discs)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:700, :1100]
    image = np.stack([(xx * 255 // 1100), (yy * 255 // 700), ((xx + yy) % 256)], -1).astype(np.uint8)
    for cx, cy in rng.integers(60, 640, (6, 2)) * [1.6, 1]:
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 40 ** 2] = rng.integers(0, 255, 3)
    return image


def test_grid_by_hand():
    assert starts(6000, 1024, 128) == [0, 896, 1792, 2688, 3584, 4480, 4976]
    assert starts(4000, 1024, 128) == [0, 896, 1792, 2688, 2976]
    assert starts(900, 1024, 128) == [0]
    rects = tile_grid(4000, 6000, 1024, 128)
    assert len(rects) == 35 and all(r[2] - r[0] == 1024 and r[3] - r[1] == 1024 for r in rects)
    assert tile_grid(500, 3000, 1024, 128)[0] == (0, 0, 1024, 500)
    # A box at x 900..1000 is inside tiles 0 (margin 24 to its right side) and 1 (margin 4 to its
    # left side): tile 0 holds it with more room.
    assert best_tile(rects, extent([900, 100, 1000, 200]), (4000, 6000)) == 0
    assert best_tile(rects, extent([1000, 100, 1100, 200]), (4000, 6000)) == 1
    assert best_tile(rects, extent([700, 100, 1300, 200]), (4000, 6000)) is None  # in no tile
    with pytest.raises(ValueError, match="--tile_overlap must be in"):
        tile_grid(10, 10, 64, 64)


def test_object_inside_one_tile_gets_the_mask_of_that_tile_alone(sam, photo):
    tiled = TiledPredictor(sam, tile=512, overlap=96)
    tiled.set_image(photo)
    assert tiled.tiles == tile_grid(700, 1100, 512, 96)
    # Inside tiles x 416..928 at y 0..512 (32 pixels from its lower side) and y 188..700 (184 from
    # its left side; its lower side is the image's): decoded in the second.
    box = np.array([600, 420, 700, 480])
    masks, iou, low = tiled.predict(box=box, point_coords=np.array([[650, 450]]), point_labels=np.array([1]))
    assert tiled.last_tile == (416, 188, 928, 700)
    x0, y0, x1, y1 = tiled.last_tile
    alone = SamPredictor(sam)
    alone.set_image(photo[y0:y1, x0:x1])
    ref_masks, ref_iou, ref_low = alone.predict(np.array([[650 - x0, 450 - y0]]), np.array([1]),
                                               box - [x0, y0, x0, y0])
    assert masks.shape == (3, 700, 1100)
    np.testing.assert_array_equal(masks[:, y0:y1, x0:x1], ref_masks)
    assert not masks[:, :, :x0].any() and not masks[:, :y0].any()
    np.testing.assert_array_equal(iou, ref_iou)
    np.testing.assert_array_equal(low, ref_low)
    bgr = TiledPredictor(sam, tile=512, overlap=96)
    bgr.set_image(np.ascontiguousarray(photo[..., ::-1]), "BGR")
    np.testing.assert_array_equal(bgr.predict(box=box, multimask_output=False)[0][0], tiled.predict(box=box, multimask_output=False)[0][0])


def test_tiles_are_embedded_once_and_unfitting_prompts_get_a_centred_window(sam, photo, monkeypatch):
    tiled = TiledPredictor(sam, tile=512, overlap=96, cached_tiles=2)
    tiled.set_image(photo)
    calls = []
    encoder = sam.image_encoder.forward
    monkeypatch.setattr(sam.image_encoder, "forward", lambda x: calls.append(1) or encoder(x))
    tiled.predict(box=np.array([20, 20, 60, 60]))
    tiled.predict(point_coords=np.array([[30, 30]]), point_labels=np.array([1]))
    assert len(calls) == 1  # the same tile: its embedding is kept
    tiled.predict(box=np.array([300, 180, 700, 300]))  # 400 wide, across the 416 border of tile 1
    assert tiled.last_tile == (244, 0, 756, 512) and len(calls) == 2
    with pytest.raises(ValueError, match="more than a 512-pixel tile"):
        tiled.predict(box=np.array([0, 0, 600, 100]))


def disc_records(obj: np.ndarray):
    """A stand-in for the per-tile generator: the parts of the known objects each tile shows."""

    def generate(tile_image):
        x0, y0 = generate.origin.pop(0)
        h, w = tile_image.shape[:2]
        out = []
        for k, mask in enumerate(obj):
            part = mask[y0:y0 + h, x0:x0 + w]
            if part.any():
                ys, xs = np.nonzero(part)
                out.append({"segmentation": part, "area": int(part.sum()),
                            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())],
                            "predicted_iou": 0.9 - 0.01 * k, "point_coords": [[float(xs.mean()), float(ys.mean())]],
                            "stability_score": 0.97, "crop_box": [0, 0, w, h]})
        return out

    return generate


def test_generator_merges_objects_across_tile_borders_into_one_record(sam):
    h, w = 300, 1000
    yy, xx = np.mgrid[:h, :w]
    objects = np.stack([
        (xx - 500) ** 2 + (yy - 150) ** 2 < 120 ** 2,  # across the border, wider than the overlap
        (xx - 560) ** 2 + (yy - 40) ** 2 < 15 ** 2,  # wholly inside the overlap: seen whole twice
        (xx - 150) ** 2 + (yy - 150) ** 2 < 50 ** 2,  # inside the first tile only
        (xx - 900) ** 2 + (yy - 150) ** 2 < 50 ** 2,  # inside the second tile only
    ])
    generator = TiledMaskGenerator(sam, tile=600, overlap=200, output_mode="uncompressed_rle")
    rects = tile_grid(h, w, 600, 200)
    assert rects == [(0, 0, 600, 300), (400, 0, 1000, 300)]
    fake = disc_records(objects)
    fake.origin = [r[:2] for r in rects]
    generator.generator.generate = fake
    records = generator.generate(np.zeros((h, w, 3), np.uint8))
    assert len(records) == 4
    found = sorted((amg.rle_to_mask(r["segmentation"]) for r in records), key=lambda m: -m.sum())
    expected = sorted(objects, key=lambda m: -m.sum())
    for mask, truth in zip(found, expected):
        np.testing.assert_array_equal(mask, truth)
    big = max(records, key=lambda r: r["area"])
    assert big["area"] == int(objects[0].sum()) and big["bbox"] == [381, 31, 238, 238]


def test_full_frame_rle_of_a_piece():
    rng = np.random.default_rng(1)
    pixels = rng.random((7, 5)) > 0.5
    pixels[0, 0] = pixels[-1, -1] = True
    piece = Piece(3, 2, pixels, (0, 0, 10, 12), False, {})
    full = np.zeros((12, 10), bool)
    full[2:9, 3:8] = pixels
    assert full_rle(piece, 12, 10) == amg.mask_to_rle_pytorch(torch.from_numpy(full)[None])[0]
    edge = Piece(5, 0, np.ones((12, 5), bool), (0, 0, 10, 12), False, {})
    whole = np.zeros((12, 10), bool)
    whole[:, 5:] = True
    assert full_rle(edge, 12, 10) == amg.mask_to_rle_pytorch(torch.from_numpy(whole)[None])[0]


def test_generator_runs_per_tile_on_the_model(sam, photo):
    generator = TiledMaskGenerator(sam, tile=400, overlap=64, points_per_side=3, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0)
    image = np.ascontiguousarray(photo[:300, :700])  # two tiles
    records = generator.generate(image)
    assert records and all(r["segmentation"].shape == image.shape[:2] for r in records)
    for r in records:
        x, y, bw, bh = r["bbox"]
        ys, xs = np.nonzero(r["segmentation"])
        assert [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()] == [x, y, bw, bh]
        assert r["area"] == len(xs)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    from segment_anything import SamPredictor, sam_model_registry
    from segment_anything.tiled_predictor import TiledPredictor
    from segment_anything.utils.random_weights import randomize_
    torch.set_num_threads(1)
    sam = randomize_(sam_model_registry["vit_t"](image_size=256), seed=0).eval()  # a 1024 tile seen at 256: fast
    h, w = (1024, 1024) if sys.argv[1] == "tile" else (4000, 6000)
    image = np.full((h, w, 3), 90, np.uint8)
    image[::7] = 200
    box = np.array([w // 2 - 40, h // 2 - 30, w // 2 + 40, h // 2 + 30])
    predictor = SamPredictor(sam) if sys.argv[1] == "tile" else TiledPredictor(sam, tile=1024, overlap=128)
    with torch.no_grad():
        predictor.set_image(image)
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "arrays": image.nbytes + masks.nbytes}))
""")


def test_a_6000x4000_image_predicts_within_the_memory_of_a_1024_tile(tmp_path):
    """Peak resident memory of one 1024x1024 image through SamPredictor, and of a 6000x4000 image
    through TiledPredictor (tile 1024): the large image adds its own pixels and its full-size
    mask, and not more than a small allowance beyond."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    peaks = {}
    for mode in ("tile", "tiled"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, cwd=REPO,
                             timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    extra = peaks["tiled"]["peak"] - peaks["tile"]["peak"]
    allowance = 64 * 2**20
    assert extra < peaks["tiled"]["arrays"] + allowance, (peaks, extra / 2**20)
