"""Validation that measures interaction: IoU after k simulated corrective clicks, starting from a
point and from a box.

Each object starts from a prompt made from its ground truth, deterministically: the point is its
deepest pixel (utils.data.prompts.center_points), the box its bounding rectangle. A point start
decodes three masks and keeps the one with the highest predicted IoU, as SamPredictor users do
with multimask_output=True; a box start decodes the single mask. Then each round adds a
corrective click (utils.clicks.corrective_click: the deepest pixel of the larger error region)
and feeds the previous low-resolution logits back as the mask prompt; an object whose mask is
already exact keeps it. "IoU after k clicks" counts corrective clicks after the first prompt, as
tools/evaluate.py's iou_click<k> does. Every object of every image is decoded together per round.
"""

from typing import Dict, List, Sequence

import numpy as np
import torch

from .clicks import next_clicks, to_input_frame
from .data.prompts import center_points, mask_to_box
from .interactive import Prompts, decode_all
from .metrics import mask_iou
from .transforms import ResizeLongestSide

STARTS = ("point", "box")


def click_keys(clicks: Sequence[int]) -> List[str]:
    """The Meter keys click_metrics returns, e.g. 'point_click1_iou'."""
    return [f"{start}_click{k}_iou" for start in STARTS for k in clicks]


def start_prompts(sam, batch, start: str) -> Prompts:
    """Every object's first prompt in the encoder's frame: its center point, or its box."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = batch.image_index.device
    coords, boxes = [], []
    for masks, size in zip(batch.masks, batch.original_sizes):
        arr = masks.cpu().numpy()
        if start == "point":
            coords.append(transform.apply_coords(np.stack([center_points(m, 1) for m in arr]), size))
        else:
            boxes.append(transform.apply_boxes(np.stack([mask_to_box(m) for m in arr]), size))
    p = batch.image_index.numel()
    if start == "point":
        points = torch.from_numpy(np.concatenate(coords).astype(np.float32)).to(device)
        return Prompts(torch.zeros(p, 4, device=device), torch.zeros(p, dtype=torch.bool, device=device), points,
                       torch.ones(p, 1, device=device), batch.image_index)
    box = torch.from_numpy(np.concatenate(boxes).astype(np.float32)).to(device)
    return Prompts(box, torch.ones(p, dtype=torch.bool, device=device), torch.zeros(p, 0, 2, device=device),
                   torch.zeros(p, 0, device=device), batch.image_index)


def _masks(sam, batch, logits: torch.Tensor) -> List[torch.Tensor]:
    """Per image (n_i, H, W) bool masks at the original size from low-res logits (P, 1, L, L)."""
    out, start = [], 0
    for i, target in enumerate(batch.masks):
        n = target.shape[0]
        full = sam.postprocess_masks(logits[start:start + n].float(), batch.input_sizes[i], batch.original_sizes[i])
        out.append(full[:, 0] > sam.mask_threshold)
        start += n
    return out


@torch.no_grad()
def click_metrics(sam, batch, embeddings: torch.Tensor, clicks: Sequence[int]) -> Dict[str, torch.Tensor]:
    """{'<start>_click<k>_iou': (P,)} for k in clicks, for a batch (utils.batch.Batch) whose
    images are embedded in embeddings (B, C, g, g)."""
    out: Dict[str, torch.Tensor] = {}
    if not clicks:
        return out
    for start in STARTS:
        prompts = start_prompts(sam, batch, start)
        low, iou = decode_all(sam, embeddings, prompts, None)
        choice = iou[:, 1:].argmax(1) + 1 if start == "point" else torch.zeros_like(iou[:, 0], dtype=torch.long)
        logits = low.gather(1, choice.view(-1, 1, 1, 1).expand(-1, 1, *low.shape[-2:]))
        preds = _masks(sam, batch, logits)
        for r in range(1, max(clicks) + 1):
            xy, labels = next_clicks(preds, batch.masks, "center")
            xy_in = to_input_frame(xy, batch, batch.original_sizes, sam.image_encoder.img_size)
            label_t = torch.from_numpy(labels).to(xy_in.device)
            prompts = prompts.add_points(xy_in, label_t)
            new, _ = decode_all(sam, embeddings, prompts, logits)
            logits = torch.where((label_t == -1).view(-1, 1, 1, 1), logits, new[:, :1])  # exact masks stay
            preds = _masks(sam, batch, logits)
            if r in clicks:
                out[f"{start}_click{r}_iou"] = torch.cat([mask_iou(p, t) for p, t in zip(preds, batch.masks)])
    return out
