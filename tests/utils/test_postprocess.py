"""Hole filling and island removal on hand-built masks, and against SAM's own function."""

import numpy as np
import pytest
import torch

from segment_anything.utils.postprocess import clean_mask, clean_masks, remove_small_regions


def ring_with_hole_and_dot():
    """A 6x6 square (36 px) with a 2x2 hole (4 px), plus a 1-px dot far away, in 12x12."""
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:7, 1:7] = True
    mask[3:5, 3:5] = False  # the hole
    mask[10, 10] = True  # the island
    return mask


def test_fills_holes_below_the_area_only():
    mask = ring_with_hole_and_dot()
    out, changed = remove_small_regions(mask, 5, "holes")
    assert changed
    expected = mask.copy()
    expected[3:5, 3:5] = True
    assert np.array_equal(out, expected)
    # A hole of exactly the area is not "smaller than" it: unchanged.
    out, changed = remove_small_regions(mask, 4, "holes")
    assert not changed and np.array_equal(out, mask)


def test_removes_islands_below_the_area_only():
    mask = ring_with_hole_and_dot()
    out, changed = remove_small_regions(mask, 2, "islands")
    expected = mask.copy()
    expected[10, 10] = False
    assert changed and np.array_equal(out, expected)
    out, changed = remove_small_regions(mask, 1, "islands")
    assert not changed and np.array_equal(out, mask)


def test_diagonal_pixels_are_connected():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one 3-px island through corners
    mask[4, 4] = True
    out, _ = remove_small_regions(mask, 2, "islands")
    assert out[:3, :3].sum() == 3 and not out[4, 4]


def test_all_islands_small_keeps_the_largest():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True  # 4 px
    mask[6:9, 6:9] = True  # 9 px
    out, changed = remove_small_regions(mask, 100, "islands")
    expected = np.zeros_like(mask)
    expected[6:9, 6:9] = True
    assert changed and np.array_equal(out, expected)


def test_clean_mask_does_holes_then_islands():
    mask = ring_with_hole_and_dot()
    out, changed = clean_mask(mask, 5)
    expected = np.zeros_like(mask)
    expected[1:7, 1:7] = True
    assert changed and np.array_equal(out, expected)


def test_clean_masks_batches_numpy_and_torch():
    one = ring_with_hole_and_dot()
    batch = np.stack([one, np.zeros_like(one), one])[None]  # (1, 3, 12, 12)
    out = clean_masks(batch, 5)
    assert out.shape == batch.shape and out.dtype == bool
    assert out[0, 0].sum() == 36 and out[0, 1].sum() == 0
    as_torch = clean_masks(torch.from_numpy(batch.astype(np.uint8)), 5)
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.bool
    assert np.array_equal(as_torch.numpy(), out)
    assert np.array_equal(clean_masks(batch, 0), batch)  # 0 = off


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="mode"):
        remove_small_regions(np.zeros((3, 3), bool), 1, "blobs")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        remove_small_regions(np.zeros((2, 3, 3), bool), 1, "holes")


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_matches_sam_on_random_masks(mode, mobile_sam):
    from mobile_sam.utils.amg import remove_small_regions as reference

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((40, 50)) < rng.uniform(0.2, 0.8)
        area = int(rng.integers(1, 30))
        ours, ours_changed = remove_small_regions(mask, area, mode)
        theirs, theirs_changed = reference(mask, area, mode)
        assert ours_changed == theirs_changed
        assert np.array_equal(ours, theirs)
