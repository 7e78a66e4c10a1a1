"""Tests for segment_anything.utils.losses and trainer.step_loss against hand-computed values."""

import math

import pytest
import torch

from segment_anything.utils.losses import (
    DEFAULT_LOSS_SPEC, bce_loss, dice_loss, focal_loss, iou_head_loss, low_res_pair, parse_loss, sam_loss, soft_iou_loss,
)
from segment_anything.utils.metrics import mask_iou
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


def test_focal_loss_by_hand():
    logits = torch.tensor([[[0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0]]])
    p2 = 1 / (1 + math.exp(-2.0))
    # pixel 1: p_t = .5, CE ln 2, alpha_t .25; pixel 2: p_t = 1 - sigmoid(2), CE softplus(2), alpha_t .75.
    expected = (0.25 * 0.5**2 * math.log(2) + 0.75 * p2**2 * softplus(2.0)) / 2
    torch.testing.assert_close(focal_loss(logits, target), torch.tensor([expected]))
    # gamma 0 and no class weighting is plain BCE
    torch.testing.assert_close(focal_loss(logits, target, alpha=-1, gamma=0.0), bce_loss(logits, target))
    unweighted = (0.5**3 * math.log(2) + p2**3 * softplus(2.0)) / 2
    torch.testing.assert_close(focal_loss(logits, target, alpha=-1, gamma=3.0), torch.tensor([unweighted]))


def test_dice_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [BIG, -BIG]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # p = [.5, .5, 1, 0], g = [1, 0, 1, 0]: 2 sum(pg) = 3, sum p + sum g = 2 + 2 = 4.
    torch.testing.assert_close(dice_loss(logits, target, smooth=0.0), torch.tensor([1 - 3 / 4]))
    torch.testing.assert_close(dice_loss(logits, target), torch.tensor([1 - 4 / 5]))  # smooth = 1
    empty = torch.full((1, 3, 3), -BIG)
    assert dice_loss(empty, torch.zeros(1, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_iou_head_loss_is_the_squared_error_against_a_constant():
    pred = torch.tensor([0.9, 0.2], requires_grad=True)
    real = torch.tensor([0.5, 0.5], requires_grad=True)
    out = iou_head_loss(pred, real)
    torch.testing.assert_close(out, torch.tensor([0.16, 0.09]))
    out.sum().backward()
    assert real.grad is None
    torch.testing.assert_close(pred.grad, torch.tensor([0.8, -0.6]))


@pytest.mark.parametrize("spec, expected", [
    ("bce=1,iou=1,iou_head=1", {"bce": 1.0, "iou": 1.0, "iou_head": 1.0}),
    ("focal=20,dice=1,iou_head=1", {"focal": 20.0, "dice": 1.0, "iou_head": 1.0}),
    (" dice = 0.5 , bce", {"dice": 0.5, "bce": 1.0}),
    ("bce=1,iou_head=0", {"bce": 1.0, "iou_head": 0.0}),
])
def test_parse_loss(spec, expected):
    assert parse_loss(spec) == expected
    assert list(parse_loss(spec)) == list(expected)  # order kept: the log shows terms as written


@pytest.mark.parametrize("spec, message", [
    ("bce=1,ce=1", "unknown term 'ce'"),
    ("bce=1,bce=2", "given twice"),
    ("bce=x", "must be a number"),
    ("bce=-1", "must be finite and >= 0"),
    ("bce=inf", "must be finite and >= 0"),
    ("bce=0", "no term with a positive weight"),
    ("", "no term with a positive weight"),
])
def test_parse_loss_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_loss(spec)


def test_sam_loss_terms_and_iou_target_is_the_thresholded_iou():
    # Soft and thresholded IoU differ here: the soft IoU sees 0.5 probabilities, the thresholded
    # mask sees a logit of exactly 0 as background (as SamPredictor: logits > mask_threshold 0.0).
    logits = torch.tensor([[[0.0, 0.5], [BIG, -BIG]], [[-0.5, 3.0], [2.0, 1.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    iou_pred = torch.tensor([0.9, 0.2], requires_grad=True)
    # Mask 1: binary [0, 1, 1, 0] vs [1, 0, 1, 0] -> IoU 1/3. Mask 2: [0, 1, 1, 1] vs all ones -> 3/4.
    real = torch.tensor([1 / 3, 3 / 4])
    weights = parse_loss("bce=1,iou=1,iou_head=0.5,focal=2,dice=3")
    out = sam_loss(logits, target, iou_pred, weights, focal_alpha=0.5, focal_gamma=1.0)
    assert list(out) == ["loss", "loss_bce", "loss_iou", "loss_iou_head", "loss_focal", "loss_dice"]
    torch.testing.assert_close(out["loss_iou_head"], (iou_pred.detach() - real) ** 2)
    torch.testing.assert_close(out["loss_bce"], bce_loss(logits, target))
    torch.testing.assert_close(out["loss_iou"], soft_iou_loss(logits, target))
    torch.testing.assert_close(out["loss_focal"], focal_loss(logits, target, 0.5, 1.0))
    torch.testing.assert_close(out["loss_dice"], dice_loss(logits, target))
    torch.testing.assert_close(out["loss"], out["loss_bce"] + out["loss_iou"] + 0.5 * out["loss_iou_head"]
                               + 2 * out["loss_focal"] + 3 * out["loss_dice"])
    # The IoU target is a constant: the IoU-head term trains the IoU head only, never the mask logits.
    out["loss_iou_head"].sum().backward()
    assert logits.grad is None
    torch.testing.assert_close(iou_pred.grad, 2 * (iou_pred.detach() - real))


def test_default_loss_is_bce_plus_soft_iou_plus_iou_head():
    logits, target, iou_pred = torch.randn(3, 5, 7), (torch.rand(3, 5, 7) > 0.5).float(), torch.rand(3)
    out = DEFAULT_LOSS_SPEC(logits, target, iou_pred)
    real = mask_iou(logits > 0, target)
    expected = bce_loss(logits, target) + soft_iou_loss(logits, target) + (iou_pred - real) ** 2
    torch.testing.assert_close(out["loss"], expected)
    assert DEFAULT_LOSS_SPEC.keys() == ("loss", "loss_bce", "loss_iou", "loss_iou_head")


def test_low_res_pair_crops_to_the_image_and_downsamples_the_target():
    # A 40 x 20 image resized to 32 x 16 inside a 32 x 32 input; low-res grid 8 x 8 (4x smaller).
    masks = torch.zeros(1, 40, 20)
    masks[0, :20, :10] = 1  # top-left quarter of the image
    logits = torch.arange(64.0).reshape(1, 8, 8)
    low, target = low_res_pair(logits, masks, (32, 16), 32)
    assert low.shape == target.shape == (1, 8, 4)
    assert torch.equal(low, logits[:, :, :4])
    expected = torch.zeros(1, 8, 4)
    expected[0, :4, :2] = 1
    assert torch.equal(target, expected)


def test_step_loss_single_process_is_mean_of_per_prompt_totals():
    totals = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    loss = step_loss({"loss": totals}, CPU)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(totals.grad, torch.full((4,), 0.25))
