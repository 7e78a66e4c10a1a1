"""Augmentation moves the image and every mask together; prompts drawn afterwards match them."""

import cv2
import numpy as np
import pytest

from segment_anything.utils.data.augment import AUGMENTATIONS, Augment, parse_augment
from segment_anything.utils.data.prompts import PromptConfig, mask_to_box, object_prompts


def scene(h=48, w=72):
    """An image whose pixels encode their own position, and three objects (one a ring)."""
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx * 3, yy * 5, (xx + yy) % 256], -1).astype(np.uint8)
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 5:15, 4:20] = 1
    cv2.circle(masks[1], (45, 24), 12, 1, -1)
    cv2.circle(masks[1], (45, 24), 6, 0, -1)
    masks[2, 30:44, 60:70] = 1
    return image, masks


def test_parse_augment():
    assert parse_augment("flip, rot90") == ("flip", "rot90")
    assert parse_augment("") == () == parse_augment("none")
    with pytest.raises(ValueError, match="rotate"):
        parse_augment("flip,rotate")


@pytest.mark.parametrize("names", [("flip",), ("rot90",), ("scale",), AUGMENTATIONS])
def test_prompts_after_geometric_augmentation_match_their_objects(names):
    image, masks = scene()
    augment = Augment(names)
    cfg = PromptConfig(prompt="box+point", num_points=3, point_mode="random", negative_points=2)
    changed = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        out_image, out_masks, kept = augment(image, masks, rng)
        assert out_masks.dtype == np.uint8 and set(np.unique(out_masks)) <= {0, 1}
        assert out_masks.shape == (len(kept), *out_image.shape[:2]) and len(kept) >= 1
        changed += out_image.shape != image.shape or not np.array_equal(out_masks, masks[kept])
        for mask in out_masks:
            box, points, labels = object_prompts(mask, cfg, rng)
            x, y = points[:, 0].astype(int), points[:, 1].astype(int)
            assert (mask[y[labels == 1], x[labels == 1]] == 1).all()
            assert (mask[y[labels == 0], x[labels == 0]] == 0).all()
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            np.testing.assert_array_equal(box, mask_to_box(mask))
    assert changed >= 6  # the augmentation really moved things


def test_flips_and_quarter_turns_move_image_and_masks_identically():
    """The image encodes positions, so the same pixel mapping must carry each object's pixels."""
    image, masks = scene()
    augment = Augment(("flip", "rot90"))
    for seed in range(8):
        out_image, out_masks, kept = augment(image, masks, np.random.default_rng(seed))
        assert kept.tolist() == [0, 1, 2]  # flips and turns lose nothing
        for k in range(3):
            before = sorted(map(tuple, image[masks[k] == 1].tolist()))
            after = sorted(map(tuple, out_image[out_masks[k] == 1].tolist()))
            assert before == after, (seed, k)


def test_same_generator_state_same_result_and_color_leaves_masks():
    image, masks = scene()
    augment = Augment(AUGMENTATIONS)
    a = augment(image, masks, np.random.default_rng(7))
    b = augment(image, masks, np.random.default_rng(7))
    c = augment(image, masks, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    out_image, out_masks, _ = Augment(("color",))(image, masks, np.random.default_rng(1))
    assert np.array_equal(out_masks, masks) and out_image.shape == image.shape


def test_an_item_keeps_at_least_one_object_when_zooming_in_would_lose_them_all():
    image = np.full((40, 40, 3), 100, np.uint8)
    masks = np.zeros((1, 40, 40), np.uint8)
    masks[0, 0, 0] = 1  # a corner pixel: any zoom-in pushes it out of the frame
    for seed in range(10):
        _, out_masks, kept = Augment(("scale",))(image, masks, np.random.default_rng(seed))
        assert kept.tolist() == [0] and out_masks.sum() >= 1
