"""The evaluate tool's literature protocols, run through a SamPredictor whose image is set:
clicks to reach an IoU (from a point and from a box), IoU under box noise, prompt following
(a point on the background, a box's leakage) and automatic masks. The metrics themselves are
in utils/eval_metrics.py."""

from typing import Dict, List, Optional

import numpy as np

from ..automatic_mask_generator import SamAutomaticMaskGenerator
from ..predictor import SamPredictor
from ..utils.clicks import click_session
from ..utils.eval_metrics import NOC_TARGETS, clicks_to_reach, far_background_point, jitter_box, outside_box_fraction

STARTS = ("point", "box")


def _iou(mask: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(mask, target).sum()
    return float(np.logical_and(mask, target).sum() / union) if union else 1.0


def _predict_fn(predictor: SamPredictor, box: Optional[np.ndarray]):
    def predict(points, labels, logits):
        masks, _, low_res = predictor.predict(points if len(points) else None, labels if len(labels) else None,
                                              box, logits, multimask_output=False)
        return masks[0], low_res
    return predict


def click_curves(predictor: SamPredictor, target: np.ndarray, box: np.ndarray, cap: int) -> Dict[str, List[float]]:
    """IoU after 1..cap interactions, from a point and from a box. From a point: the first click
    is the simulated corrective click on an empty mask (the object's deepest pixel), then cap-1
    more. From a box: the box alone is the first interaction, then cap-1 corrective clicks."""
    none = (np.zeros((0, 2), np.float32), np.zeros((0,), np.float32))
    empty = np.zeros_like(target, dtype=bool)
    from_point = click_session(_predict_fn(predictor, None), target, *none, empty, None, cap)
    box_predict = _predict_fn(predictor, box)
    first, logits = box_predict(*none, None)
    from_box = [first] + click_session(box_predict, target, *none, first, logits, cap - 1)
    return {"point": [_iou(m, target) for m in from_point], "box": [_iou(m, target) for m in from_box]}


def noc_entries(curves: Dict[str, List[float]], cap: int) -> Dict[str, float]:
    """{"noc85_point": k, "noc90_point": k, "noc85_box": ..., ...} from click_curves."""
    return {f"noc{round(t * 100)}_{start}": float(clicks_to_reach(curves[start], t, cap))
            for start in STARTS for t in NOC_TARGETS}


def box_noise_entries(predictor: SamPredictor, target: np.ndarray, box: np.ndarray, percents: List[int],
                      rng: np.random.Generator) -> Dict[str, float]:
    """{"iou_box_noise{p}": IoU} with each box side jittered by up to p % of the box size."""
    out = {}
    for p in percents:
        jittered = jitter_box(box, p / 100, rng, target.shape)
        masks, _, _ = predictor.predict(box=jittered, multimask_output=False)
        out[f"iou_box_noise{p}"] = _iou(masks[0], target)
    return out


def box_leakage(predictor: SamPredictor, box: np.ndarray) -> float:
    """Share of the box-prompted mask outside its box."""
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    return outside_box_fraction(masks[0], box)


def background_point(predictor: SamPredictor, objects: np.ndarray) -> Dict[str, float]:
    """The mask a single positive point far from every object gives: its area in pixels and as a
    share of the image (a model that follows the prompt keeps it small)."""
    point = far_background_point(objects)
    masks, _, _ = predictor.predict(point[None], np.ones(1, np.float32), multimask_output=False)
    area = float(masks[0].sum())
    return {"background_point_area": area, "background_point_fraction": area / objects.size}


def automatic_masks(sam, image: np.ndarray, **options) -> Dict[str, list]:
    """SamAutomaticMaskGenerator's masks of one image and their predicted IoUs (the AP ranking)."""
    records = SamAutomaticMaskGenerator(sam, **options).generate(image)
    return {"pred": [r["segmentation"].astype(bool) for r in records], "scores": [r["predicted_iou"] for r in records]}
