"""Helpers of the automatic mask generator: point grids, crops, boxes, stability, RLE.

Coordinates are pixels, x before y; boxes are XYXY unless a name says XYWH. Masks are
(N, H, W) bool. RLEs follow COCO: counts of alternating runs, starting with background,
in column-major (Fortran) order.
"""

import math
from itertools import product
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points xy in [0, 1]: cell centres of an n x n grid, x varying fastest."""
    half_step = 1 / (2 * n_per_side)
    centres = np.linspace(half_step, 1 - half_step, n_per_side)
    xs, ys = np.meshgrid(centres, centres)  # (n, n) each, rows = y
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer 0..n_layers; layer i has n_per_side / scale_per_layer**i points a side."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int, overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """Crop boxes XYXY (ints) and their layer index. Layer 0 is the whole image; layer i >= 1
    tiles the image with 2**i x 2**i crops that overlap by ``overlap_ratio`` of the short side
    (scaled down with the number of crops). im_size: (H, W)."""
    im_h, im_w = im_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(im_h, im_w) * 2 / per_side)
        # Crop length such that per_side crops with this overlap cover the side.
        crop_w = math.ceil((overlap * (per_side - 1) + im_w) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + im_h) / per_side)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):  # x-major order, as SAM lists them
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at threshold + offset and threshold - offset.
    The first is inside the second, so the IoU is a ratio of areas. (N, H, W) -> (N,)."""
    inner = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int32)
    outer = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int32)
    return inner / outer


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive pixel indices, int64) around (..., H, W) bool masks;
    an empty mask gives [0, 0, 0, 0]. Returns (..., 4)."""
    lead = masks.shape[:-2]
    h, w = masks.shape[-2:]
    flat = masks.reshape(-1, h, w)
    if flat.shape[0] == 0:
        return torch.zeros(*lead, 4, dtype=torch.long, device=masks.device)
    rows, cols = flat.any(2), flat.any(1)  # (N, H), (N, W)

    def first_last(hit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = hit.shape[1]
        first = hit.int().argmax(1)
        last = n - 1 - hit.flip(1).int().argmax(1)
        return first, last

    y0, y1 = first_last(rows)
    x0, x1 = first_last(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).long()
    boxes[~rows.any(1)] = 0
    return boxes.reshape(*lead, 4)


def box_near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0) -> torch.Tensor:
    """(N,) bool: boxes (N, 4) XYXY in crop pixels that come within ``atol`` of a crop edge
    that is not also an edge of the image (the object probably continues outside the crop)."""
    boxes = uncrop_boxes(boxes, crop_box).float()
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float, device=boxes.device)
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(1)


def uncrop_boxes(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Boxes (..., 4) XYXY from crop to image pixels."""
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Points (..., 2) xy from crop to image pixels."""
    return points + torch.tensor(list(crop_box[:2]), device=points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """(N, h, w) masks of a crop, zero-padded into the (N, orig_h, orig_w) image frame."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return torch.nn.functional.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


def xyxy_to_xywh(box: Sequence[float]) -> List[float]:
    x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Uncompressed COCO RLE {"size": [H, W], "counts": [...]} of an (H, W) bool mask."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # runs start with background
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """(H, W) bool mask from an uncompressed RLE."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    return flat.reshape(w, h).T


def rle_area(rle: Dict[str, Any]) -> int:
    """Foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Compressed COCO RLE of an (H, W) bool mask, with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle
