"""The prediction CLI: PNGs written with the right size and content; input errors are clear."""

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import require_shared_data
from segment_anything.tools import predict
from segment_anything.tools._model import build_base
from segment_anything.utils.data import load_image
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import save_partial_weight

SIZE = 256
PHOTO = "d60153c0-db67-11e8-9658-0242ac1c0002.jpg"  # 564 x 423
SMALL = "3493127D-7B19-4E50-94AE-2401BD2A91C8.jpg"  # 194 x 259


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tuned = randomize_(build_base("vit_t", "none", SIZE), seed=4)
    path = tmp_path_factory.mktemp("w") / "best.pth"
    return save_partial_weight(tuned, path, {"model_type": "vit_t", "image_size": SIZE}, keys=["mask_decoder"])


@pytest.fixture(scope="module")
def images():
    return require_shared_data("nails") / "images"


def run(weights, *args):
    predict.main(["--model_type", "vit_t", "--checkpoint", "none", "--weights", str(weights), *map(str, args)])


def read(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} missing or unreadable"
    return image


def test_box_and_points_write_mask_and_overlay(weights, images, tmp_path):
    run(weights, "--image", images / PHOTO, "--box", "60,80,300,420", "--point", "200,250", "--point", "100,100,0",
        "--multimask", "--output", tmp_path)
    photo = load_image(images / PHOTO)
    stem = PHOTO.rsplit(".", 1)[0]
    masks = [read(tmp_path / f"{stem}_mask_0_{k}.png") for k in range(3)]
    for mask in masks:
        assert mask.shape == photo.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert any(0 < (m > 0).mean() < 1 for m in masks), "every mask is blank or full"
    overlay = cv2.cvtColor(read(tmp_path / f"{stem}_overlay.png"), cv2.COLOR_BGR2RGB)
    assert overlay.shape == photo.shape
    changed = (overlay != photo).any(-1)
    assert changed.mean() > 0.01
    assert (overlay[250, 200] == [0, 220, 0]).all()  # the positive point is drawn in green
    assert (overlay[100, 100] == [230, 30, 30]).all()  # the negative one in red


def test_folder_with_prompts_json(weights, images, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({
        PHOTO: [{"box": [60, 80, 300, 420]}, {"points": [[400, 200, 1]]}],
        SMALL.rsplit(".", 1)[0]: {"box": [20, 30, 150, 200], "points": [[80, 100]]},
    }))
    out = tmp_path / "out"
    run(weights, "--image", images, "--prompts", prompts, "--output", out)
    written = sorted(p.name for p in out.iterdir())
    photo_stem, small_stem = PHOTO.rsplit(".", 1)[0], SMALL.rsplit(".", 1)[0]
    assert written == sorted([f"{photo_stem}_mask_0.png", f"{photo_stem}_mask_1.png", f"{photo_stem}_overlay.png",
                              f"{small_stem}_mask_0.png", f"{small_stem}_overlay.png"])
    assert read(out / f"{small_stem}_mask_0.png").shape == (259, 194)


def test_no_prompt_gives_automatic_masks(weights, images, tmp_path):
    run(weights, "--image", images / SMALL, "--points_per_side", "4", "--pred_iou_thresh", "-5",
        "--stability_score_thresh", "0", "--output", tmp_path)
    stem = SMALL.rsplit(".", 1)[0]
    records = json.loads((tmp_path / f"{stem}_auto.json").read_text())
    assert records and {"segmentation", "area", "bbox", "predicted_iou", "stability_score"} <= set(records[0])
    masks = sorted(tmp_path.glob(f"{stem}_mask_*.png"))
    assert len(masks) == len(records)
    assert read(masks[0]).shape == (259, 194) and read(masks[0]).any()
    assert read(tmp_path / f"{stem}_overlay.png").shape == (259, 194, 3)


def test_weights_for_another_model_type_is_a_clear_error(images, tmp_path):
    other = tmp_path / "vit_b.pth"
    torch.save({"format": "sam-partial-v1", "model_type": "vit_b", "image_size": SIZE,
                "model": {"mask_decoder.iou_token.weight": torch.zeros(1, 256)}}, other)
    with pytest.raises(ValueError, match="fine-tuned for model_type 'vit_b'"):
        run(other, "--image", images / SMALL, "--box", "1,2,3,4", "--output", tmp_path)
    unlabeled = tmp_path / "flat.pth"
    torch.save({"image_encoder.neck.0.weight": torch.zeros(256, 768, 1, 1)}, unlabeled)  # vit_b's neck shape
    with pytest.raises(ValueError, match="another model type"):
        run(unlabeled, "--image", images / SMALL, "--box", "1,2,3,4", "--output", tmp_path, "--image_size", SIZE)


@pytest.mark.parametrize("content, message", [
    ({SMALL: {"box": [5, 5, 1, 1]}}, "x1 <= x2"),
    ({SMALL: {"points": [[1, 2, 7]]}}, "label 1"),
    ({"nope.jpg": {"box": [1, 2, 3, 4]}}, "nope.jpg"),
    ({SMALL: {"polygon": []}}, "expected"),
])
def test_bad_prompts_name_the_file_and_entry(weights, images, tmp_path, content, message):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        run(weights, "--image", images, "--prompts", prompts, "--output", tmp_path)
    assert "prompts.json" in str(err.value)


def test_automatic_masks_that_find_nothing_write_the_image_and_say_so(weights, images, tmp_path, capsys):
    """Strict thresholds leave no mask: a normal outcome, not a crash."""
    run(weights, "--image", images / SMALL, "--points_per_side", "4", "--pred_iou_thresh", "2",
        "--output", tmp_path)
    stem = SMALL.rsplit(".", 1)[0]
    assert json.loads((tmp_path / f"{stem}_auto.json").read_text()) == []
    assert not list(tmp_path.glob(f"{stem}_mask_*.png"))
    overlay = cv2.cvtColor(read(tmp_path / f"{stem}_overlay.png"), cv2.COLOR_BGR2RGB)
    assert (overlay == load_image(images / SMALL)).all()  # nothing drawn over the image
    out = capsys.readouterr().out
    assert "no automatic mask" in out and "--pred_iou_thresh 2" in out


def test_a_box_outside_the_image_is_refused_and_one_partly_outside_clipped(weights, images, tmp_path, capsys):
    # SMALL is 194 x 259 (W x H).
    with pytest.raises(ValueError, match=r"--box 300,10,400,50 lies outside .*194x259"):
        run(weights, "--image", images / SMALL, "--box", "300,10,400,50", "--output", tmp_path)
    with pytest.raises(ValueError, match=r"--point 10,300 lies outside .*194x259"):
        run(weights, "--image", images / SMALL, "--point", "10,300", "--output", tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    run(weights, "--image", images / SMALL, "--box", "-20,30,150,400", "--output", tmp_path)
    assert "clipped to 0,30,150,259" in capsys.readouterr().out
    assert read(tmp_path / f"{SMALL.rsplit('.', 1)[0]}_mask_0.png").shape == (259, 194)


def test_a_bad_image_leaves_no_output_folder_behind_and_keeps_what_was_written(weights, tmp_path):
    """Without prompts, images are read one by one as masks are made: a bad one stops the command
    with one line; the folders it made for nothing go again, what it wrote for earlier images stays."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b.png").write_bytes(b"not an image")
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match="b.png: cannot read image"):
        run(weights, "--image", folder / "b.png", "--points_per_side", "2", "--output", out)
    assert not (tmp_path / "new").exists()
    cv2.imwrite(str(folder / "a.png"), np.full((40, 48, 3), 90, np.uint8))
    with pytest.raises(ValueError, match="b.png: cannot read image"):
        run(weights, "--image", folder, "--points_per_side", "2", "--output", out)
    assert (out / "a_overlay.png").is_file()
