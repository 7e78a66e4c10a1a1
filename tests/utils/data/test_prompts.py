"""Prompts from object masks: boxes as cv2.boundingRect, points inside, negatives beside, jitter."""

import cv2
import numpy as np
import pytest

from segment_anything.utils.data.prompts import (
    PromptConfig, center_points, inside_distance, jitter_box, mask_to_box, negative_points, object_prompts,
    random_points,
)


def ring(h=64, w=80, center=(40, 30), outer=20, inner=12) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, center, outer, 1, -1)
    cv2.circle(mask, center, inner, 0, -1)
    return mask


def crescent(h=64, w=64) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (32, 32), 22, 1, -1)
    cv2.circle(mask, (40, 32), 18, 0, -1)
    return mask


def inside(mask: np.ndarray, points: np.ndarray) -> bool:
    xs, ys = points[:, 0].astype(int), points[:, 1].astype(int)
    assert np.array_equal(xs, points[:, 0]) and np.array_equal(ys, points[:, 1]), "points name pixels"
    return bool(mask[ys, xs].all())


def test_box_is_the_bounding_rectangle_with_exclusive_end():
    mask = np.zeros((20, 30), np.uint8)
    mask[3:7, 5:12] = 1
    mask[15, 20] = 1  # a separate blob still counts
    np.testing.assert_array_equal(mask_to_box(mask), [5, 3, 21, 16])
    assert mask_to_box(mask).dtype == np.float32
    with pytest.raises(ValueError, match="no foreground"):
        mask_to_box(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("shape", [ring, crescent])
def test_center_point_is_inside_where_the_centroid_is_not(shape):
    mask = shape()
    ys, xs = np.nonzero(mask)
    centroid = np.array([[round(xs.mean()), round(ys.mean())]], np.float32)
    assert not inside(mask, centroid), "the shape must be one whose centroid falls outside"
    (point,) = center_points(mask, 1)
    assert inside(mask, point[None])
    # it is the pixel deepest inside the object: as far from the background as any pixel can be
    assert inside_distance(mask)[int(point[1]), int(point[0])] == inside_distance(mask).max()


def test_center_of_an_object_touching_the_image_edge_is_not_on_the_edge():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, :10] = 1  # a band along the left edge: without a 0 border column 0 would look deepest
    (x, y), = center_points(mask, 1)
    assert x in (4, 5) and 4 <= y <= 35


def test_several_center_points_are_inside_distinct_and_deterministic():
    mask = ring()
    pts = center_points(mask, 4)
    assert pts.shape == (4, 2) and inside(mask, pts)
    assert len({tuple(p) for p in pts.tolist()}) == 4
    np.testing.assert_array_equal(pts, center_points(mask, 4))
    # spread out: the two first points are on opposite sides of the hole (ring diameter 32-40)
    assert np.hypot(*(pts[0] - pts[1])) > 28
    assert min(np.hypot(*(p - q)) for i, p in enumerate(pts) for q in pts[:i]) > 15


def test_random_points_are_uniform_over_the_object_and_follow_the_generator():
    mask = crescent()
    pts = random_points(mask, 2000, np.random.default_rng(0))
    assert inside(mask, pts)
    five = random_points(mask, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(five, random_points(mask, 5, np.random.default_rng(0)))
    assert not np.array_equal(five, random_points(mask, 5, np.random.default_rng(1)))
    # uniform: the share of points on the left half matches the share of object pixels there
    ys, xs = np.nonzero(mask)
    assert np.mean(pts[:, 0] < 32) == pytest.approx(np.mean(xs < 32), abs=0.04)
    tiny = np.zeros((5, 5), np.uint8)
    tiny[2, 3] = 1
    np.testing.assert_array_equal(random_points(tiny, 3, np.random.default_rng(0)), [[3, 2]] * 3)


def test_negative_points_are_background_inside_the_box():
    mask = ring()
    box = mask_to_box(mask)
    neg = negative_points(mask, box, 50, np.random.default_rng(0))
    assert neg.shape == (50, 2)
    x, y = neg[:, 0].astype(int), neg[:, 1].astype(int)
    assert (mask[y, x] == 0).all()
    assert ((x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])).all()
    assert len({tuple(p) for p in neg.tolist()}) == 50  # drawn without replacement
    full = np.zeros((10, 10), np.uint8)
    full[2:6, 3:8] = 1  # a filled rectangle: its box has no background
    assert negative_points(full, mask_to_box(full), 3, np.random.default_rng(0)).shape == (0, 2)


def test_object_prompts_layout_positives_negatives_then_padding():
    full = np.zeros((10, 10), np.uint8)
    full[2:6, 3:8] = 1
    cfg = PromptConfig(prompt="box+point", num_points=2, negative_points=2)
    box, pts, labels = object_prompts(full, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(box, [3, 2, 8, 6])
    assert pts.shape == (4, 2) and labels.tolist() == [1, 1, -1, -1]  # no background in the box
    mask = ring()
    box, pts, labels = object_prompts(mask, cfg, np.random.default_rng(0))
    assert labels.tolist() == [1, 1, 0, 0]
    assert inside(mask, pts[:2]) and inside(1 - mask, pts[2:])
    _, pts, labels = object_prompts(mask, PromptConfig(prompt="box", num_points=3), np.random.default_rng(0))
    assert pts.shape == (0, 2) and labels.shape == (0,)


def test_box_jitter_moves_each_side_within_the_fraction_and_stays_in_the_image():
    box = np.array([10, 20, 50, 40], np.float32)  # w 40, h 20
    rng = np.random.default_rng(0)
    boxes = np.stack([jitter_box(box, 0.1, (100, 200), rng) for _ in range(500)])
    delta = np.abs(boxes - box)
    assert (delta[:, [0, 2]] <= 4 + 1e-5).all() and (delta[:, [1, 3]] <= 2 + 1e-5).all()
    assert delta[:, [0, 2]].max() > 3.5 and delta.min() < 0.1  # the whole range is used
    edge = np.stack([jitter_box(np.array([0, 0, 30, 10], np.float32), 0.4, (10, 30), rng) for _ in range(200)])
    assert (edge >= 0).all() and (edge[:, 2] <= 30).all() and (edge[:, 3] <= 10).all()
    assert (edge[:, 2] > edge[:, 0]).all() and (edge[:, 3] > edge[:, 1]).all()
    np.testing.assert_array_equal(jitter_box(box, 0.0, (100, 200), rng), box)
    # only when asked (training): validation prompts keep the exact box
    mask = ring()
    cfg = PromptConfig(box_jitter=0.2)
    np.testing.assert_array_equal(object_prompts(mask, cfg, np.random.default_rng(0))[0], mask_to_box(mask))
    assert not np.array_equal(object_prompts(mask, cfg, np.random.default_rng(0), jitter=True)[0], mask_to_box(mask))


def test_prompt_config_rejects_nonsense():
    with pytest.raises(ValueError, match="prompt"):
        PromptConfig(prompt="boxes")
    with pytest.raises(ValueError, match="point_mode"):
        PromptConfig(point_mode="centre")
    with pytest.raises(ValueError, match="box_jitter"):
        PromptConfig(box_jitter=0.5)
    assert PromptConfig(prompt="point", num_points=2, negative_points=1).points_per_object == 3
    assert not PromptConfig(prompt="point").uses_box and PromptConfig(prompt="box+point").uses_box
