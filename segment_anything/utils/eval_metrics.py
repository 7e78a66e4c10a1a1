"""Evaluation metrics of the interactive-segmentation and SAM literature, on numpy masks.

- NoC@τ (number of clicks to reach IoU τ, capped): the standard score of interactive segmentation
  since Xu et al. 2016 ("Deep Interactive Object Selection") and the benchmark protocol of
  Sofiiuk et al. 2022 (RITM); clicks are simulated at the centre of the largest error region
  (utils/clicks.corrective_click), counted with the first interaction as click 1.
- IoU under box noise: robustness of a box-prompted model to a user's imprecise box, as in the
  jittered-box evaluations of SAM's successors (e.g. SAM-HQ, MedSAM); each side moves by up to the
  stated fraction of the box's width or height.
- Prompt following: a single positive point on the background far from every object should give
  a small mask, and a box prompt's mask should stay inside the box.
- Object size: COCO's area ranges (Lin et al. 2014): small < 32², medium < 96², large otherwise.
- Automatic masks: mask AP at IoU 0.50:0.95 computed by pycocotools' COCOeval (the COCO metric),
  and recall at IoU 0.5 (the share of objects that some automatic mask covers with IoU >= 0.5).
"""

import contextlib
import io
from typing import Dict, List, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

NOC_TARGETS = (0.85, 0.90)
NOC_CAP = 20
SIZE_BOUNDS = (32 ** 2, 96 ** 2)  # COCO's small / medium / large area limits in pixels
SIZES = ("small", "medium", "large")
BOX_NOISE = (0.0, 0.05, 0.10, 0.20)


def clicks_to_reach(ious: Sequence[float], target: float, cap: int = NOC_CAP) -> int:
    """NoC: the smallest k (1-based) with ious[k-1] >= target among the first ``cap`` entries;
    ``cap`` when never reached (the literature's convention)."""
    for k, iou in enumerate(ious[:cap], 1):
        if iou >= target:
            return k
    return cap


def size_bucket(area: int) -> str:
    """'small', 'medium' or 'large' by COCO's pixel-area bounds."""
    return SIZES[int(np.searchsorted(SIZE_BOUNDS, area, side="right"))]


def jitter_box(box: np.ndarray, fraction: float, rng: np.random.Generator, shape) -> np.ndarray:
    """xyxy box with each side moved by uniform(-fraction, fraction) of the box's width (x sides)
    or height (y sides), kept inside the (H, W) image and at least one pixel wide."""
    box = np.asarray(box, np.float64)
    w, h = box[2] - box[0], box[3] - box[1]
    moved = box + rng.uniform(-fraction, fraction, 4) * np.array([w, h, w, h])
    height, width = shape[:2]
    x0, x1 = np.clip(moved[[0, 2]], 0, width)
    y0, y1 = np.clip(moved[[1, 3]], 0, height)
    x1, y1 = max(x1, min(x0 + 1, width)), max(y1, min(y0 + 1, height))
    return np.array([min(x0, x1 - 1), min(y0, y1 - 1), x1, y1], np.float32)


def far_background_point(objects: np.ndarray) -> np.ndarray:
    """xy float32 (2,): the background pixel farthest from every object ((H, W) bool union of all
    objects); ties to the first in row-major order. An image that is all object has none: ValueError."""
    background = ~objects.astype(bool)
    if not background.any():
        raise ValueError("no background pixel")
    dist = cv2.distanceTransform(background.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if objects.any():
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    else:  # nothing to keep away from: the image centre
        y, x = objects.shape[0] // 2, objects.shape[1] // 2
    return np.array([x, y], np.float32)


def outside_box_fraction(mask: np.ndarray, box: np.ndarray) -> float:
    """Share of the predicted pixels outside the xyxy box (pixel edges; 0 for an empty mask)."""
    total = int(mask.sum())
    if total == 0:
        return 0.0
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside = int(mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)].sum())
    return (total - inside) / total


def mask_iou_matrix(pred: List[np.ndarray], gt: List[np.ndarray]) -> np.ndarray:
    """(P, G) IoU of every predicted mask with every ground-truth mask, all (H, W) bool."""
    if not pred or not gt:
        return np.zeros((len(pred), len(gt)))
    p = np.stack([m.reshape(-1) for m in pred]).astype(np.float64)
    g = np.stack([m.reshape(-1) for m in gt]).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def automatic_mask_scores(images: List[Dict]) -> Dict[str, float]:
    """Mask AP at IoU 0.50:0.95 (pycocotools COCOeval, segm, up to 1000 masks per image) and
    recall at IoU 0.5 over all images.

    images: per image {"gt": [(H, W) bool], "pred": [(H, W) bool], "scores": [float]} (scores rank
    the predicted masks: SAM's predicted IoU)."""
    def rle(m):
        encoded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode("ascii")
        return encoded

    gt_json = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    results, covered, total = [], 0, 0
    for i, item in enumerate(images):
        h, w = item["gt"][0].shape if item["gt"] else item["pred"][0].shape
        gt_json["images"].append({"id": i, "height": h, "width": w})
        for m in item["gt"]:
            gt_json["annotations"].append({"id": len(gt_json["annotations"]) + 1, "image_id": i, "category_id": 1,
                                           "segmentation": rle(m), "area": float(m.sum()), "iscrowd": 0,
                                           "bbox": list(mask_utils.toBbox(rle(m)))})
        for m, s in zip(item["pred"], item["scores"]):
            results.append({"image_id": i, "category_id": 1, "segmentation": rle(m), "score": float(s)})
        ious = mask_iou_matrix(item["pred"], item["gt"])
        covered += int((ious.max(0) >= 0.5).sum()) if ious.size else 0
        total += len(item["gt"])
    out = {"recall@0.5": covered / total if total else float("nan"), "objects": total,
           "masks": len(results), "ap": float("nan")}
    if not results or not total:
        out["ap"] = 0.0 if total else float("nan")
        return out
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="segm")
        evaluator.params.maxDets = [1, 10, 1000]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, 0, 0, -1]  # (IoU thresholds, recall points) at area all, 1000 masks
    out["ap"] = float(np.mean(precision[precision > -1])) if (precision > -1).any() else 0.0
    return out
