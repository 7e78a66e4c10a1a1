"""The literature's evaluation metrics on hand-built cases whose answers are known."""

import numpy as np
import pytest

from segment_anything.utils.clicks import click_session
from segment_anything.utils.eval_metrics import (automatic_mask_scores, clicks_to_reach, far_background_point,
                                                 jitter_box, outside_box_fraction, size_bucket)


def test_clicks_to_reach_counts_the_first_interaction_as_one_and_caps():
    ious = [0.5, 0.86, 0.95]
    assert clicks_to_reach(ious, 0.85) == 2 and clicks_to_reach(ious, 0.90) == 3
    assert clicks_to_reach(ious, 0.99, cap=20) == 20
    assert clicks_to_reach([0.3] * 30 + [1.0], 0.85, cap=20) == 20  # reached only after the cap


def two_squares():
    target = np.zeros((40, 80), bool)
    target[5:35, 5:35] = True  # 900 px: the deeper region, clicked first
    target[10:20, 50:60] = True  # 100 px
    return target


def component_predictor(target):
    """A perfect 'model': the mask is the union of the target's connected pieces that hold a
    positive click (so each corrective click adds exactly one piece)."""
    import cv2
    _, labels = cv2.connectedComponents(target.astype(np.uint8))

    def predict(points, labels_, logits):
        mask = np.zeros_like(target)
        for (x, y), lab in zip(points, labels_):
            if lab == 1 and labels[int(y), int(x)]:
                mask |= labels == labels[int(y), int(x)]
        return mask, np.zeros((1, 4, 4), np.float32)

    return predict


def test_noc_on_a_case_where_the_click_count_is_known():
    target = two_squares()
    empty = np.zeros_like(target)
    masks = click_session(component_predictor(target), target, np.zeros((0, 2)), np.zeros(0), empty, None, 20)
    ious = [(m & target).sum() / (m | target).sum() for m in masks]
    assert ious[0] == pytest.approx(0.9) and ious[1] == 1.0  # the big square, then the small one
    assert clicks_to_reach(ious, 0.85) == 1 and clicks_to_reach(ious, 0.90) == 1
    assert clicks_to_reach(ious, 0.95) == 2


def test_coco_size_bounds():
    assert [size_bucket(a) for a in (1, 1023, 1024, 9215, 9216)] == ["small", "small", "medium", "medium", "large"]


def test_jitter_box_moves_each_side_by_at_most_the_fraction_and_is_seeded():
    box = np.array([20, 10, 60, 30], np.float32)  # 40 wide, 20 high
    assert np.array_equal(jitter_box(box, 0.0, np.random.default_rng(0), (100, 100)), box)
    moved = jitter_box(box, 0.1, np.random.default_rng(1), (100, 100))
    assert np.all(np.abs(moved - box) <= np.array([4, 2, 4, 2]) + 1e-5) and not np.array_equal(moved, box)
    assert np.array_equal(moved, jitter_box(box, 0.1, np.random.default_rng(1), (100, 100)))
    edge = jitter_box(np.array([0, 0, 100, 100], np.float32), 0.5, np.random.default_rng(2), (100, 100))
    assert edge.min() >= 0 and edge.max() <= 100


def test_far_background_point_is_the_pixel_farthest_from_every_object():
    objects = np.zeros((20, 100), bool)
    objects[:, :10] = True
    assert far_background_point(objects).tolist() == [99, 0]


def test_outside_box_fraction_by_hand():
    mask = np.zeros((10, 10), bool)
    mask[0:4, 0:5] = True  # 20 px, 8 of them (columns 0-1) left of the box
    assert outside_box_fraction(mask, np.array([2, 0, 10, 10])) == pytest.approx(8 / 20)
    assert outside_box_fraction(np.zeros((5, 5), bool), np.array([0, 0, 5, 5])) == 0.0


def square(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_automatic_mask_ap_against_hand_computed_values():
    gt = square((30, 30), 0, 10, 0, 10)  # 100 px
    pred = square((30, 30), 0, 9, 0, 8)  # 72 px inside it: IoU 0.72, a match at thresholds 0.50 ... 0.70
    scores = automatic_mask_scores([{"gt": [gt], "pred": [pred], "scores": [0.9]}])
    assert scores["ap"] == pytest.approx(0.5) and scores["recall@0.5"] == 1.0
    # A higher-scored false positive halves the precision at recall 1 at every threshold.
    wrong = square((30, 30), 20, 30, 20, 30)
    scores = automatic_mask_scores([{"gt": [gt], "pred": [gt, wrong], "scores": [0.5, 0.9]}])
    assert scores["ap"] == pytest.approx(0.5) and scores["recall@0.5"] == 1.0
    none = automatic_mask_scores([{"gt": [gt], "pred": [wrong], "scores": [0.9]}])
    assert none["ap"] == 0.0 and none["recall@0.5"] == 0.0
