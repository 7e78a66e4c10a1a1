"""Tests for segment_anything.utils.losses and trainer.step_loss against hand-computed values."""

import math

import pytest
import torch

from segment_anything.utils.losses import bce_loss, mask_dice, mask_iou, sam_loss, soft_iou_loss
from segment_anything.utils.trainer import step_loss

BIG = 100.0  # sigmoid(BIG) == 1 and sigmoid(-BIG) == 0 in float32
CPU = torch.device("cpu")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_is_per_mask_mean():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # BCE with logits: softplus(-x) for a target 1, softplus(x) for a target 0.
    first = (softplus(-0.0) + softplus(2.0) + softplus(1.0) + softplus(-3.0)) / 4
    second = math.log(2.0)
    out = bce_loss(logits, target)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([first, second]), rtol=1e-6, atol=1e-7)


def test_soft_iou_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [BIG, -BIG]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # p = [.5, .5, 1, 0], g = [1, 0, 1, 0]: intersection 1.5, union 1 + .5 + 1 + 0 = 2.5.
    torch.testing.assert_close(soft_iou_loss(logits, target, eps=0.0), torch.tensor([1 - 1.5 / 2.5]))
    torch.testing.assert_close(soft_iou_loss(logits, target), torch.tensor([1 - 2.5 / 3.5]))  # eps = 1


def test_soft_iou_loss_extremes_and_gradient():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    perfect = torch.where(target > 0, BIG, -BIG)
    wrong = -perfect
    out = soft_iou_loss(torch.stack([perfect[0], wrong[0]]), target, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))
    # The eps keeps an empty target with an empty prediction at loss 0 and a finite gradient.
    logits = torch.full((1, 4, 4), -BIG, requires_grad=True)
    loss = soft_iou_loss(logits, torch.zeros(1, 4, 4))
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_mask_iou_and_dice_by_hand():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]]])
    target = torch.tensor([[[1, 0, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]])
    # 1: inter 1, union 3, |p| + |g| = 4; 2: identical; 3: both empty (defined as 1); 4: disjoint.
    torch.testing.assert_close(mask_iou(pred, target), torch.tensor([1 / 3, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(mask_dice(pred, target), torch.tensor([2 / 4, 1.0, 1.0, 0.0]))
    # bool and 0/1 inputs are the same thing
    torch.testing.assert_close(mask_iou(pred.bool(), target.float()), mask_iou(pred, target))


def test_sam_loss_terms_and_iou_target_is_the_thresholded_iou():
    # Soft and thresholded IoU differ here: the soft IoU sees 0.5 probabilities, the thresholded
    # mask sees a logit of exactly 0 as background (as SamPredictor: logits > mask_threshold 0.0).
    logits = torch.tensor([[[0.0, 0.5], [BIG, -BIG]], [[-0.5, 3.0], [2.0, 1.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    iou_pred = torch.tensor([0.9, 0.2], requires_grad=True)
    # Mask 1: binary [0, 1, 1, 0] vs [1, 0, 1, 0] -> IoU 1/3. Mask 2: [0, 1, 1, 1] vs all ones -> 3/4.
    real = torch.tensor([1 / 3, 3 / 4])
    out = sam_loss(logits, target, iou_pred, iou_loss_weight=0.5)
    assert set(out) == {"total", "bce", "iou", "iou_mse", "real_iou"}
    torch.testing.assert_close(out["real_iou"], real)
    torch.testing.assert_close(out["iou_mse"], (iou_pred.detach() - real) ** 2)
    torch.testing.assert_close(out["bce"], bce_loss(logits, target))
    torch.testing.assert_close(out["iou"], soft_iou_loss(logits, target))
    torch.testing.assert_close(out["total"], out["bce"] + out["iou"] + 0.5 * out["iou_mse"])
    # The IoU target is a constant: the MSE term trains the IoU head only, never the mask logits.
    out["iou_mse"].sum().backward()
    assert logits.grad is None
    torch.testing.assert_close(iou_pred.grad, 2 * (iou_pred.detach() - real))


def test_sam_loss_weight_zero_drops_the_iou_head_term():
    logits, target = torch.randn(3, 5, 7), (torch.rand(3, 5, 7) > 0.5).float()
    out = sam_loss(logits, target, torch.rand(3), iou_loss_weight=0.0)
    torch.testing.assert_close(out["total"], out["bce"] + out["iou"])


def test_step_loss_single_process_is_mean_of_per_prompt_totals():
    totals = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    loss = step_loss({"total": totals}, CPU)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(totals.grad, torch.full((4,), 0.25))
