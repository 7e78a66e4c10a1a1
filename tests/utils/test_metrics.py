"""Tests for segment_anything.utils.metrics against hand-computed values."""

import pytest
import torch

from segment_anything.utils.metrics import Meter, mask_dice, mask_iou

CPU = torch.device("cpu")


def test_mask_iou_and_dice_by_hand():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]]])
    target = torch.tensor([[[1, 0, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]])
    # 1: inter 1, union 3, |p| + |g| = 4; 2: identical; 3: both empty (defined as 1); 4: disjoint.
    torch.testing.assert_close(mask_iou(pred, target), torch.tensor([1 / 3, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(mask_dice(pred, target), torch.tensor([2 / 4, 1.0, 1.0, 0.0]))
    # bool and 0/1 inputs are the same thing
    torch.testing.assert_close(mask_iou(pred.bool(), target.float()), mask_iou(pred, target))


def test_meter_reduce_is_a_global_mean_not_a_mean_of_batch_means():
    meter = Meter(["loss", "iou", "dice"])
    meter.add({"loss": torch.tensor([1.0, 2.0, 3.0]), "iou": torch.tensor([0.0, 0.5, 1.0]),
               "dice": torch.tensor([0.0, 1.0, 1.0])}, images=2)
    meter.add({"loss": torch.tensor([10.0]), "iou": torch.tensor([1.0]), "dice": torch.tensor([0.5])}, images=1)
    out = meter.reduce(CPU)
    # Mean of means would give loss (2 + 10) / 2 = 6 and IoU (0.5 + 1) / 2 = 0.75.
    assert out == pytest.approx({"loss": 16 / 4, "iou": 2.5 / 4, "dice": 2.5 / 4, "prompts": 4, "images": 3})
    empty = Meter(["loss", "iou"]).reduce(CPU)  # an empty shard divides by 1, not 0
    assert empty == {"loss": 0.0, "iou": 0.0, "prompts": 0, "images": 0}
    with pytest.raises(ValueError, match="differ"):
        meter.add({"loss": torch.tensor([1.0])}, images=1)
