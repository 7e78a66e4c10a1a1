"""Mask clean-up shared by prediction, validation and automatic masks: fill small holes and
drop small islands, the post-processing SAM applies with ``min_mask_region_area``.

Connectivity is 8 (diagonal neighbours touch), as in SAM. A "hole" is any connected part of
the background, including the background around the object: if the whole background is smaller
than the area, the mask becomes full, as in SAM's own post-processing.
"""

from typing import Tuple, Union

import cv2
import numpy as np
import torch

MODES = ("holes", "islands")


def _components(binary: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Labels (H, W) int32 with 0 = outside ``binary``, and the area of each label 1..n as (n,)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return labels, stats[1:count, cv2.CC_STAT_AREA]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (mode "holes") or remove islands (mode "islands") of fewer than
    ``area_thresh`` pixels in one mask.

    Args:
        mask: (H, W) bool or {0, 1}.
        area_thresh: regions with an area strictly below it (pixels) change.
        mode: "holes" or "islands". When every island is small, the largest one is kept,
            so a mask never becomes empty by this step.
    Returns:
        (mask (H, W) bool, changed). The input is returned as is when nothing changes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"remove_small_regions expects one (H, W) mask, got shape {mask.shape}")
    binary = mask.astype(bool)
    target = ~binary if mode == "holes" else binary
    labels, areas = _components(target)
    small = np.flatnonzero(areas < area_thresh) + 1  # label ids
    if small.size == 0:
        return mask.astype(bool), False
    if mode == "holes":
        return binary | np.isin(labels, small), True
    if small.size == areas.size:  # all islands are small: keep the largest rather than nothing
        return labels == int(np.argmax(areas)) + 1, True
    return binary & ~np.isin(labels, small), True


def clean_mask(mask: np.ndarray, min_area: float) -> Tuple[np.ndarray, bool]:
    """Holes first, then islands, as SAM does. (H, W) -> ((H, W) bool, changed)."""
    mask, holes_changed = remove_small_regions(mask, min_area, "holes")
    mask, islands_changed = remove_small_regions(mask, min_area, "islands")
    return mask, holes_changed or islands_changed


def clean_masks(masks: Union[np.ndarray, torch.Tensor], min_area: float) -> Union[np.ndarray, torch.Tensor]:
    """Apply :func:`clean_mask` to every mask of a batch.

    Args:
        masks: (..., H, W) bool or {0, 1}, numpy or torch (any device).
        min_area: pixels; 0 or less returns the masks unchanged (as bool).
    Returns:
        bool masks of the same shape and kind (a torch tensor stays on its device).
    """
    is_torch = isinstance(masks, torch.Tensor)
    if min_area <= 0:
        return masks.bool() if is_torch else np.asarray(masks).astype(bool)
    array = masks.detach().cpu().numpy() if is_torch else np.asarray(masks)
    if array.ndim < 2:
        raise ValueError(f"clean_masks expects (..., H, W) masks, got shape {array.shape}")
    flat = array.reshape(-1, *array.shape[-2:])
    out = np.stack([clean_mask(m, min_area)[0] for m in flat]) if len(flat) else flat.astype(bool)
    out = out.reshape(array.shape)
    return torch.from_numpy(out).to(masks.device) if is_torch else out
