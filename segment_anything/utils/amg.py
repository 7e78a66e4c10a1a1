"""Helpers of the automatic mask generator: point grids, crops, boxes, stability, RLE.

Public names, signatures and results are those of Meta's ``segment_anything.utils.amg``, so code
written against Meta's package imports them from ours. Coordinates are pixels, x before y; boxes
are XYXY unless a name says XYWH. Masks are (N, H, W) bool. RLEs follow COCO: counts of
alternating runs, starting with background, in column-major (Fortran) order.
"""

import math
from itertools import product
from typing import Any, Dict, Generator, ItemsView, List, Sequence, Tuple

import numpy as np
import torch

from .postprocess import remove_small_regions  # noqa: F401  (Meta's package keeps it here)

COLUMN_TYPES = (list, np.ndarray, torch.Tensor)


class MaskData:
    """Per-mask columns (lists, numpy arrays or tensors, all of one length) filtered and
    concatenated together, so a mask's box, score and RLE never fall out of step."""

    def __init__(self, **kwargs) -> None:
        for key, value in kwargs.items():
            self._check(key, value)
        self._stats = dict(kwargs)

    @staticmethod
    def _check(key: str, value: Any) -> None:
        if not isinstance(value, COLUMN_TYPES):
            raise TypeError(f"MaskData column {key!r} must be a list, numpy array or tensor, got {type(value).__name__}")

    def __setitem__(self, key: str, item: Any) -> None:
        self._check(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the rows that ``keep`` selects (a bool mask or indices), in every column, in place."""
        keep = torch.as_tensor(keep)
        rows = keep.nonzero().flatten().tolist() if keep.dtype == torch.bool else keep.flatten().tolist()
        for key, value in self._stats.items():
            if isinstance(value, torch.Tensor):
                self._stats[key] = value[keep.to(value.device)]
            elif isinstance(value, np.ndarray):
                self._stats[key] = value[keep.cpu().numpy()]
            elif isinstance(value, list):
                self._stats[key] = [value[i] for i in rows]
            elif value is not None:
                raise TypeError(f"MaskData column {key!r} has an unsupported type {type(value).__name__}")

    def cat(self, new_stats: "MaskData") -> None:
        """Append the rows of ``new_stats`` (copies of its lists; new columns are taken as they are)."""
        for key, value in new_stats.items():
            mine = self._stats.get(key)
            if mine is None:
                self._stats[key] = value.clone() if isinstance(value, torch.Tensor) else (
                    value.copy() if isinstance(value, (np.ndarray, list)) else value)
            elif isinstance(value, torch.Tensor):
                self._stats[key] = torch.cat([mine, value])
            elif isinstance(value, np.ndarray):
                self._stats[key] = np.concatenate([mine, value])
            elif isinstance(value, list):
                self._stats[key] = mine + list(value)
            else:
                raise TypeError(f"MaskData column {key!r} has an unsupported type {type(value).__name__}")

    def to_numpy(self) -> None:
        """Every tensor column as a numpy array on the CPU, in place."""
        for key, value in self._stats.items():
            if isinstance(value, torch.Tensor):
                self._stats[key] = value.detach().cpu().numpy()


def batch_iterator(batch_size: int, *args) -> Generator[List[Any], None, None]:
    """Slices of batch_size rows (the last one shorter) taken from each of args at the same rows."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs at least one sequence, all of the same length")
    for start in range(0, len(args[0]), batch_size):
        yield [a[start : start + batch_size] for a in args]


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


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at mask_threshold + offset and mask_threshold - offset.
    The first is inside the second, so the IoU is a ratio of areas. (..., H, W) logits -> (...)."""
    inner = (masks > mask_threshold + threshold_offset).flatten(-2).sum(-1, dtype=torch.int32)
    outer = (masks > mask_threshold - threshold_offset).flatten(-2).sum(-1, dtype=torch.int32)
    return inner / outer


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
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


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int],
                          atol: float = 20.0) -> torch.Tensor:
    """(N,) bool: boxes (N, 4) XYXY in crop pixels that come within ``atol`` of a crop edge
    that is not also an edge of the image (the object probably continues outside the crop)."""
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
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


def box_xyxy_to_xywh(box_xyxy: torch.Tensor) -> torch.Tensor:
    """One box XYXY -> XYWH, as a new tensor (or list, given a list)."""
    box = box_xyxy.clone() if isinstance(box_xyxy, torch.Tensor) else list(box_xyxy)
    box[2] = box[2] - box[0]
    box[3] = box[3] - box[1]
    return box


def mask_to_rle_pytorch(tensor: torch.Tensor) -> List[Dict[str, Any]]:
    """Uncompressed COCO RLEs {"size": [H, W], "counts": [...]} of (B, H, W) bool masks."""
    b, h, w = tensor.shape
    flat = tensor.transpose(1, 2).reshape(b, h * w).bool()
    change = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu()
    first = flat[:, 0].cpu().tolist() if h * w else [False] * b
    out = []
    for i in range(b):
        ends = change[change[:, 0] == i, 1] + 1
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), ends, torch.full((1,), h * w, dtype=torch.long)])
        counts = ([0] if first[i] else []) + bounds.diff().tolist()  # runs start with background
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """(H, W) bool mask from an uncompressed RLE."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    return flat.reshape(w, h).T


def area_from_rle(rle: Dict[str, Any]) -> int:
    """Foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Compressed COCO RLE of an uncompressed one, with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils  # optional: only coco_rle output needs it

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle
