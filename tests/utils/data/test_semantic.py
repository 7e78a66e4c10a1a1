"""Semantic mode's pieces against hand-computed values: loss terms, confusion-matrix metrics,
the global meter, class lists and per-pixel targets from each data format."""

import base64
import json
import math

import cv2
import numpy as np
import pytest
import torch

from segment_anything.utils.data import DataError, DataOptions, load_records
from segment_anything.utils.data.semantic import class_names, semantic_target
from segment_anything.utils.semantic_train import (IGNORE, ClassMeter, SemanticLoss, ce_loss, class_scores, confusion,
                                                   dice_loss, parse_loss)


def two_pixel_case():
    """One image, 2 classes, pixels A (logits 0, 0; class 0), B (logits ln 3, 0; class 1), C ignored."""
    logits = torch.tensor([[0.0, math.log(3), 5.0], [0.0, 0.0, -5.0]]).reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, IGNORE]]])
    return logits, target


def test_cross_entropy_by_hand():
    logits, target = two_pixel_case()
    # A: -log(1/2); B: p(class 1) = 1 / (3 + 1): -log(1/4); C does not count.
    assert ce_loss(logits, target).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)


def test_dice_loss_by_hand():
    logits, target = two_pixel_case()
    # softmax A (1/2, 1/2), B (3/4, 1/4); one-hot A (1, 0), B (0, 1); smooth 1.
    class0 = (2 * 0.5 + 1) / (0.5 + 0.75 + 1 + 1)
    class1 = (2 * 0.25 + 1) / (0.5 + 0.25 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - (class0 + class1) / 2, rel=1e-6)


def test_loss_spec_weights_and_names():
    logits, target = two_pixel_case()
    spec = SemanticLoss(parse_loss("ce=2,dice=0.5"))
    out = spec(logits, target)
    assert spec.keys() == ("loss", "loss_ce", "loss_dice") and set(out) == set(spec.keys())
    assert out["loss"].item() == pytest.approx(2 * out["loss_ce"].item() + 0.5 * out["loss_dice"].item())
    assert parse_loss("bce=1,iou=1,iou_head=1") == {"ce": 1.0}  # the prompt default means plain CE
    with pytest.raises(ValueError, match="terms are ce, dice"):
        parse_loss("bce=1")


def test_confusion_and_per_class_scores_by_hand():
    pred = torch.tensor([0, 1, 1, 2, 0])
    target = torch.tensor([0, 1, 2, 2, IGNORE])
    conf = confusion(pred, target, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0] = expected[1, 1] = expected[2, 1] = expected[2, 2] = 1
    assert torch.equal(conf, expected)
    iou, dice = class_scores(conf)
    assert iou[:3].tolist() == pytest.approx([1.0, 0.5, 0.5]) and dice[:3].tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert math.isnan(iou[3]) and math.isnan(dice[3])  # class 3: in neither prediction nor truth


def test_meter_reports_global_ratios_not_means_of_means():
    """Two batches: class 1 is 1 of 1 pixel right in the first, 0 of 3 in the second. Global IoU
    is 1/4 (sums), the mean of the per-batch IoUs would be 1/2."""
    meter = ClassMeter(["loss"], ["background", "thing"])
    meter.add({"loss": torch.tensor([1.0])}, confusion(torch.tensor([1, 0]), torch.tensor([1, 0]), 2))
    meter.add({"loss": torch.tensor([3.0, 5.0])}, confusion(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 0]), 2))
    out = meter.reduce(torch.device("cpu"))
    assert out["iou_thing"] == pytest.approx(1 / 4) and out["iou_background"] == pytest.approx(2 / 5)
    assert out["dice_thing"] == pytest.approx(2 / 5)
    assert out["iou"] == pytest.approx((1 / 4 + 2 / 5) / 2) and out["loss"] == pytest.approx(3.0) and out["images"] == 3


# ----------------------------------------------------------------------------- targets per format


def write_image(path, hw):
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8))


def test_folder_target_is_binary(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:9] = 255
    mask[10:15, 20:28] = 255  # a second component: another object, the same class
    (tmp_path / "images").mkdir(), (tmp_path / "labels").mkdir()
    write_image(tmp_path / "images" / "a.png", (20, 30))
    cv2.imwrite(str(tmp_path / "labels" / "a.png"), mask)
    records = load_records(tmp_path, "folder")
    classes = class_names(records)
    assert classes == ["background", "object"]
    np.testing.assert_array_equal(semantic_target(records[0], {c: i for i, c in enumerate(classes)}), mask // 255)


def test_instance_map_values_are_class_ids(tmp_path):
    labels = np.zeros((20, 30), np.uint16)
    labels[2:6, 3:9], labels[10:15, 20:28] = 1, 3
    (tmp_path / "images").mkdir(), (tmp_path / "labels").mkdir()
    write_image(tmp_path / "images" / "a.png", (20, 30))
    cv2.imwrite(str(tmp_path / "labels" / "a.png"), labels)
    records = load_records(tmp_path, "instance_map")
    assert class_names(records) == ["background", "1", "2", "3"]
    assert class_names(records, 5) == ["background", "1", "2", "3", "4"]
    np.testing.assert_array_equal(semantic_target(records[0], {}), labels.astype(np.int64))
    with pytest.raises(DataError, match=r"labels/a.png: label value 3 >= --num_classes 3"):
        class_names(records, 3)


def test_labelme_categories_sorted_and_painted(tmp_path):
    def poly(label, x0, y0, x1, y1):
        return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "shape_type": "polygon",
                "group_id": None, "flags": {}}

    ok, png = cv2.imencode(".png", np.zeros((20, 30, 3), np.uint8))
    data = {"version": "5.2.1", "imagePath": "a.png", "imageData": base64.b64encode(png.tobytes()).decode(),
            "imageHeight": 20, "imageWidth": 30, "shapes": [poly("zebra", 2, 2, 10, 10), poly("ant", 15, 5, 25, 15)]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    records = load_records(tmp_path, "labelme")
    classes = class_names(records)
    assert classes == ["background", "ant", "zebra"]  # sorted, not file order
    target = semantic_target(records[0], {c: i for i, c in enumerate(classes)})
    masks = records[0].load_masks()
    np.testing.assert_array_equal(target, np.where(masks[1] > 0, 1, np.where(masks[0] > 0, 2, 0)))
    assert set(np.unique(target)) == {0, 1, 2}
    with pytest.raises(DataError, match="--num_classes 2, but the data has 3 classes"):
        class_names(records, 2)


def test_coco_categories_to_classes(tmp_path):
    write_image(tmp_path / "x.png", (20, 30))
    square = lambda x0, y0, s: [[x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]]
    data = {"images": [{"id": 1, "file_name": "x.png", "height": 20, "width": 30}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": square(2, 2, 8)},
                            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": square(6, 6, 8)}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    records = load_records(tmp_path / "ann.json", "coco", images=str(tmp_path))
    classes = class_names(records)
    assert classes == ["background", "cat", "dog"]
    target = semantic_target(records[0], {c: i for i, c in enumerate(classes)})
    dog, cat = records[0].load_masks()
    expected = np.zeros((20, 30), np.int64)
    expected[dog > 0] = 2
    expected[cat > 0] = 1  # the later object wins where they overlap
    np.testing.assert_array_equal(target, expected)
    assert (target == 1).sum() > 0 and (target == 2).sum() > 0 and (dog & cat).sum() > 0


@pytest.mark.parametrize("flags, message", [
    ({"num_classes": 3}, "--num_classes needs --task semantic"),
    ({"task": "semantic", "num_classes": 1}, "--num_classes must be >= 2"),
    ({"task": "semantic", "prompt": "point"}, "--task semantic takes no prompts"),
    ({"task": "semantic", "augment": "flip"}, "--augment is not available with --task semantic"),
    ({"task": "semantic", "loss": "bce=1"}, "terms are ce, dice"),
])
def test_config_refuses_what_semantic_mode_cannot_do(flags, message):
    from segment_anything.training.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**flags)
    assert TrainConfig(task="semantic", loss="ce=1,dice=1").task == "semantic"
