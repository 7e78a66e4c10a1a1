"""Boundary IoU and corrective clicks on hand-built masks."""

import numpy as np
import pytest
import torch

from segment_anything.utils.clicks import click_session, corrective_click
from segment_anything.utils.metrics import boundary_iou, mask_boundary, mask_iou


def square(top, left, side, size=20):
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_boundary_is_the_inner_ring():
    ring = mask_boundary(square(5, 5, 10), 1)
    assert ring.sum() == 36 and not ring[6:14, 6:14].any() and ring[5, 5:15].all()
    assert mask_boundary(square(5, 5, 10), 2).sum() == 100 - 36
    # The image edge counts as outside: a mask that fills the image has a boundary along it.
    assert mask_boundary(np.ones((6, 6), bool), 1).sum() == 20


def test_boundary_iou_by_hand():
    gt, shifted = square(5, 5, 10), square(5, 6, 10)
    # 20x20 image: diagonal 28.3, 2 % -> 1 px. The rings share rows 5 and 14 at columns 6..14:
    # 18 px; union 36 + 36 - 18 = 54.
    out = boundary_iou(torch.from_numpy(np.stack([shifted, gt, np.zeros_like(gt)])),
                       torch.from_numpy(np.stack([gt, gt, np.zeros_like(gt)])))
    torch.testing.assert_close(out, torch.tensor([18 / 54, 1.0, 1.0]))
    iou = mask_iou(torch.from_numpy(shifted[None]), torch.from_numpy(gt[None]))
    assert iou.item() == pytest.approx(90 / 110) and out[0] < iou.item()
    assert boundary_iou(torch.from_numpy(gt[None]), torch.zeros(1, 20, 20)).item() == 0.0


def test_click_on_missed_object_is_positive_at_its_centre():
    gt = square(5, 5, 10)
    xy, label = corrective_click(np.zeros_like(gt), gt)
    assert label == 1 and xy.tolist() == [9.0, 9.0]  # first of the four deepest pixels, row-major


def test_click_on_extra_region_is_negative():
    gt = square(2, 2, 6)
    pred = gt | square(11, 11, 7)  # 49 wrong pixels, none missed
    xy, label = corrective_click(pred, gt)
    assert label == 0 and xy.tolist() == [14.0, 14.0]
    assert corrective_click(gt, gt) is None


def test_larger_error_region_wins():
    gt = square(0, 0, 10) | square(14, 14, 3)  # 100 + 9 object pixels
    pred = square(0, 0, 10) | square(12, 0, 4)  # misses 9, adds 16
    assert corrective_click(pred, gt)[1] == 0
    pred = square(0, 0, 10) | square(12, 0, 2)  # misses 9, adds 4
    xy, label = corrective_click(pred, gt)
    assert label == 1 and xy.tolist() == [15.0, 15.0]


def test_click_session_adds_clicks_and_passes_logits():
    gt = square(2, 2, 5) | square(12, 12, 5)
    seen = []

    def predict(points, labels, logits):
        """A toy model: the target's squares that hold a positive click; logits count the calls."""
        seen.append((points.copy(), labels.copy(), None if logits is None else logits.copy()))
        mask = np.zeros_like(gt)
        for (x, y), label in zip(points, labels):
            if label == 1:
                mask |= square(2, 2, 5) if x < 10 else square(12, 12, 5)
        return mask, np.full((1, 4, 4), float(len(seen)))

    first = square(2, 2, 5)
    masks = click_session(predict, gt, np.array([[4.0, 4.0]]), np.array([1.0]), first, np.zeros((1, 4, 4)), 3)
    assert len(masks) == 3 and all(np.array_equal(m, gt) for m in masks)
    assert len(seen) == 1  # after the first click the mask is right: no more calls
    points, labels, logits = seen[0]
    assert points.tolist() == [[4.0, 4.0], [14.0, 14.0]] and labels.tolist() == [1.0, 1.0]
    assert np.array_equal(logits, np.zeros((1, 4, 4)))  # the previous round's logits
