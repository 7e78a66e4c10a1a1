"""SamAutomaticMaskGenerator: masks for a whole image from a grid of point prompts.

Same constructor parameters, defaults and output records as Meta's class. The steps: for the
whole image and for each crop of each crop layer, prompt SAM with a grid of single foreground
points (three masks each), keep the masks whose predicted IoU and stability score pass the
thresholds and that do not touch an inner crop edge, remove duplicates with box NMS inside the
crop and then across crops, and optionally clean small holes and islands.
"""

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .modeling import Sam
from .predictor import SamPredictor
from .utils import amg
from .utils.postprocess import clean_mask

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _concat(parts: List[amg.MaskData]) -> amg.MaskData:
    """The masks of all parts, in order; empty columns of the usual dtypes when there is none."""
    parts = [p for p in parts if len(p["rles"])]
    if not parts:
        return amg.MaskData(rles=[], boxes=torch.zeros(0, 4, dtype=torch.long), iou_preds=torch.zeros(0),
                            points=torch.zeros(0, 2, dtype=torch.float64), stability_score=torch.zeros(0),
                            crop_boxes=torch.zeros(0, 4, dtype=torch.long))
    out = amg.MaskData()
    for part in parts:
        out.cat(part)
    return out


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of (N, 4) XYXY boxes (torchvision.ops.box_area's formula)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by box NMS over all masks (one category), best score first.

    torchvision is imported here, on first use: importing it (and the torch._dynamo it pulls
    in) costs about 2 CPU seconds, and `import segment_anything` at every training start and
    in every tool should not pay it when no automatic masks are generated."""
    from torchvision.ops import batched_nms

    return batched_nms(boxes.float(), scores.float(), torch.zeros(len(boxes), device=boxes.device), iou_threshold)


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        """
        Args:
            model: the SAM model.
            points_per_side: grid points per image side (points_per_side**2 prompts on layer 0);
                None when ``point_grids`` is given instead.
            points_per_batch: prompts decoded at once (memory vs speed).
            pred_iou_thresh: keep masks whose predicted IoU is above this (0 = off).
            stability_score_thresh: keep masks whose stability score is at least this (0 = off).
            stability_score_offset: logit offset of the two thresholds the stability score compares.
            box_nms_thresh: box IoU above which a mask of the same crop is a duplicate.
            crop_n_layers: extra layers of crops; layer i has (2**i)**2 crops.
            crop_nms_thresh: box IoU above which masks of different crops are duplicates
                (the mask of the smaller crop wins).
            crop_overlap_ratio: overlap of neighbouring crops in layer 1, as a share of the image's
                short side (smaller in later layers).
            crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points a side.
            point_grids: explicit (K, 2) grids in [0, 1] xy, one per layer.
            min_mask_region_area: if > 0, fill holes and remove islands smaller than this many
                pixels (utils/postprocess.py), then NMS again.
            output_mode: "binary_mask" ((H, W) bool), "uncompressed_rle" or "coco_rle" (pycocotools).
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Give exactly one of points_per_side and point_grids.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if output_mode == "coco_rle":
            try:
                import pycocotools  # noqa: F401
            except ImportError as err:
                raise ImportError("output_mode='coco_rle' needs pycocotools: pip install pycocotools") from err
        if point_grids is None:
            point_grids = amg.build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}")
        self.point_grids = point_grids
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for an (H, W, 3) uint8 RGB image, as a list of records:
        ``segmentation`` ((H, W) bool, or an RLE dict), ``area`` (pixels), ``bbox`` (XYWH pixels),
        ``predicted_iou``, ``stability_score``, ``point_coords`` ([[x, y]] prompt, pixels),
        ``crop_box`` (XYWH pixels of the crop the mask came from)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"generate expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))
        return [self._record(data, i) for i in range(len(data["rles"]))]

    def _record(self, data: amg.MaskData, i: int) -> Dict[str, Any]:
        rle = data["rles"][i]
        if self.output_mode == "binary_mask":
            segmentation = amg.rle_to_mask(rle)
        elif self.output_mode == "coco_rle":
            segmentation = amg.coco_encode_rle(rle)
        else:
            segmentation = rle
        return {
            "segmentation": segmentation,
            "area": amg.area_from_rle(rle),
            "bbox": amg.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
            "predicted_iou": data["iou_preds"][i].item(),
            "point_coords": [data["points"][i].tolist()],
            "stability_score": data["stability_score"][i].item(),
            "crop_box": amg.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
        }

    def _generate_masks(self, image: np.ndarray) -> amg.MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layers = amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _concat([self._process_crop(image, box, layer, orig_size) for box, layer in zip(crop_boxes, layers)])
        if len(crop_boxes) > 1 and len(data["rles"]):
            # Across crops, prefer the mask from the smaller crop (it saw the object at a higher resolution).
            data.filter(_nms(data["boxes"], 1 / _box_area(data["crop_boxes"].float()), self.crop_nms_thresh))
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer: int, orig_size: Tuple[int, int]) -> amg.MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        self.predictor.set_image(crop)
        # Grid points in [0, 1] scaled to crop pixels (x by width, y by height).
        points = self.point_grids[layer] * np.array(crop.shape[:2])[None, ::-1]
        parts = [self._process_batch(batch, crop.shape[:2], crop_box, orig_size)
                 for (batch,) in amg.batch_iterator(self.points_per_batch, points)]
        self.predictor.reset_image()
        data = _concat(parts)
        if len(data["rles"]):
            data.filter(_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = amg.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = amg.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.long).reshape(-1, 4)
        return data

    def _process_batch(
        self, points: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int], orig_size: Tuple[int, int]
    ) -> amg.MaskData:
        """Decode (B, 2) crop-pixel points into up to 3B filtered masks (boxes still in the crop frame)."""
        predictor = self.predictor
        coords = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), device=predictor.device)
        labels = torch.ones(len(points), 1, dtype=torch.int, device=predictor.device)
        logits, iou_preds, _ = predictor.predict_torch(coords[:, None, :], labels, multimask_output=True, return_logits=True)
        per_point = logits.shape[1]
        logits, iou_preds = logits.flatten(0, 1), iou_preds.flatten(0, 1)
        pts = torch.as_tensor(points).repeat_interleave(per_point, dim=0)

        keep = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        if self.pred_iou_thresh > 0:
            keep &= iou_preds > self.pred_iou_thresh
        logits, iou_preds, pts = logits[keep], iou_preds[keep], pts[keep.cpu()]
        threshold = predictor.model.mask_threshold
        stability = amg.calculate_stability_score(logits, threshold, self.stability_score_offset)
        keep = stability >= self.stability_score_thresh if self.stability_score_thresh > 0 else torch.ones_like(stability, dtype=torch.bool)
        masks = logits[keep] > threshold
        boxes = amg.batched_mask_to_box(masks)
        orig_h, orig_w = orig_size
        inside = ~amg.is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        keep_idx = keep.nonzero().flatten()[inside]
        masks = amg.uncrop_masks(masks[inside], crop_box, orig_h, orig_w)
        return amg.MaskData(
            rles=amg.mask_to_rle_pytorch(masks),
            boxes=boxes[inside].cpu(),
            iou_preds=iou_preds[keep_idx].float().cpu(),
            points=pts[keep_idx.cpu()],
            stability_score=stability[keep_idx].float().cpu(),
        )

    @staticmethod
    def postprocess_small_regions(mask_data: amg.MaskData, min_area: int, nms_thresh: float) -> amg.MaskData:
        """Fill holes and remove islands below ``min_area`` pixels in every mask, then NMS again
        with unchanged masks preferred (score 1) over changed ones (score 0). Returns new data."""
        data = mask_data
        if not len(data["rles"]):
            return data
        cleaned = [clean_mask(amg.rle_to_mask(rle), min_area) for rle in data["rles"]]
        masks = torch.from_numpy(np.stack([m for m, _ in cleaned]))
        unchanged = torch.tensor([0.0 if changed else 1.0 for _, changed in cleaned])
        boxes = amg.batched_mask_to_box(masks)
        keep = _nms(boxes, unchanged, nms_thresh)
        data = amg.MaskData(**dict(data.items(), rles=list(data["rles"]), boxes=data["boxes"].clone()))
        for i in keep.tolist():
            if cleaned[i][1]:
                data["rles"][i] = amg.mask_to_rle_pytorch(torch.from_numpy(cleaned[i][0])[None])[0]
                data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data
