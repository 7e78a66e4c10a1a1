"""--tile / --tile_overlap in predict (prompts and automatic masks) and evaluate (vit_t, random weights)."""

import argparse

import cv2
import numpy as np
import pytest

from segment_anything import SamPredictor
from segment_anything.tiled_predictor import TiledPredictor
from segment_anything.tools import evaluate, predict
from segment_anything.tools._model import add_model_args, build_base, load_model
from segment_anything.utils.data import load_records, make_synthetic_dataset
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import save_partial_weight

SIZE = 128


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tuned = randomize_(build_base("vit_t", "none", SIZE), seed=4)
    path = tmp_path_factory.mktemp("w") / "best.pth"
    return save_partial_weight(tuned, path, {"model_type": "vit_t", "image_size": SIZE}, keys=["mask_decoder"])


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    yy, xx = np.mgrid[:300, :500]
    image = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "wide.png"
    cv2.imwrite(str(path), image[..., ::-1])
    return path, image


def run(weights, *args):
    predict.main(["--model_type", "vit_t", "--checkpoint", "none", "--weights", str(weights), *map(str, args)])


def test_predict_with_tiles_writes_full_size_masks_of_the_tile(weights, picture, tmp_path):
    path, image = picture
    run(weights, "--image", path, "--box", "330,40,380,90", "--tile", 256, "--tile_overlap", 32, "--output", tmp_path)
    mask = cv2.imread(str(tmp_path / "wide_mask_0.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (300, 500)
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    sam = load_model(parser.parse_args(["--model_type", "vit_t", "--checkpoint", "none"]), str(weights))  # predict's
    tiled = TiledPredictor(sam, 256, 32)
    tiled.set_image(image)
    x0, y0, x1, y1 = tiled.tile_for(box=np.array([330, 40, 380, 90]))
    alone = SamPredictor(sam)
    alone.set_image(image[y0:y1, x0:x1])
    ref, _, _ = alone.predict(box=np.array([330 - x0, 40 - y0, 380 - x0, 90 - y0]), multimask_output=False)
    np.testing.assert_array_equal(mask[y0:y1, x0:x1] > 0, ref[0])
    assert not mask[:, :x0].any() and not mask[y1:].any()


def test_predict_automatic_masks_with_tiles(weights, picture, tmp_path):
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), picture[1][:200, :400, ::-1])  # two tiles
    run(weights, "--image", path, "--tile", 256, "--tile_overlap", 32, "--points_per_side", 2,
        "--pred_iou_thresh", 0, "--stability_score_thresh", 0, "--output", tmp_path / "out")
    assert (tmp_path / "out" / "small_auto.json").is_file()
    mask = cv2.imread(str(tmp_path / "out" / "small_mask_0.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (200, 400)


def test_bad_tile_flags_are_named_before_the_model_loads(weights, picture, tmp_path):
    path, _ = picture
    with pytest.raises(ValueError, match=r"--tile_overlap must be in \[0, --tile\), got 300 with --tile 256"):
        run(weights, "--image", path, "--box", "1,1,20,20", "--tile", 256, "--tile_overlap", 300, "--output", tmp_path)


def test_evaluate_scores_prompts_in_their_tiles_with_clicks(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n=2, size_range=(300, 340), objects=2)
    records = load_records(root)
    sam = randomize_(build_base("vit_t", "none", SIZE), seed=1).eval()
    prompts = evaluate.object_prompt_list(records, evaluate.PromptConfig(prompt="box"), seed=0)
    rows = evaluate.score_model(sam, records, prompts, [1, 2], 0, tile=160, tile_overlap=48)
    assert len(rows) == len(prompts) == 4
    assert all(0 <= r["iou"] <= 1 and 0 <= r["iou_click2"] <= 1 for r in rows)
