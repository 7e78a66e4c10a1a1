"""Quality of thresholded masks (IoU, Dice) and the global Meter that averages them over an epoch.

Metrics are apart from the losses: they measure the binary mask a user gets, never carry a
gradient, and are reduced as global sums and counts across ranks (no mean of means).
"""

from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import torch

from .distributed import all_reduce_sum


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks, per mask. (P, H, W) bool/0-1 -> (P,); an empty union counts as 1."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mask_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks, per mask. (P, H, W) -> (P,); two empty masks count as 1."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    total = pred.sum(1).float() + target.sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


class Meter:
    """Global per-prompt means of named (P,) values over an epoch.

    Sums stay on the device (no host sync per step); reduce() all-reduces them once across
    ranks, then divides by the global prompt count. The keys are fixed up front, so a rank that
    saw no batch (an empty validation shard) still joins the same all-reduce.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = sorted(keys)
        self.sums: Optional[torch.Tensor] = None  # one entry per key, then prompts, then images

    def add(self, terms: Dict[str, torch.Tensor], images: int) -> None:
        """terms: {key: (P,) tensor} for this step's P prompts, exactly the Meter's keys."""
        if sorted(terms) != self.keys:
            raise ValueError(f"Meter.add: keys {sorted(terms)} differ from the Meter's {self.keys}")
        ref = terms[self.keys[0]]
        step = torch.stack([terms[k].detach().double().sum() for k in self.keys]
                           + [ref.new_tensor(float(ref.numel()), dtype=torch.float64),
                              ref.new_tensor(float(images), dtype=torch.float64)])
        self.sums = step if self.sums is None else self.sums + step

    def reduce(self, device: torch.device) -> Dict[str, float]:
        """{key: global mean per prompt, 'prompts': int, 'images': int}."""
        values = self.sums if self.sums is not None else torch.zeros(len(self.keys) + 2, dtype=torch.float64)
        total = all_reduce_sum(values.to(device)).tolist()
        prompts, images = total[-2], total[-1]
        out = {k: v / max(prompts, 1.0) for k, v in zip(self.keys, total)}
        out.update(prompts=int(prompts), images=int(images))
        return out


# --- Boundary quality (evaluate tool; Cheng et al., "Boundary IoU", CVPR 2021) ---


def mask_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: the mask's pixels within ``width`` pixels of its outline (the mask minus its
    erosion by a 3x3 square ``width`` times). Outside the image counts as background, so an object
    cut by the image edge has a boundary there too."""
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=width)[1:-1, 1:-1]
    return mask.astype(bool) & ~eroded.astype(bool)


def boundary_iou(pred: torch.Tensor, target: torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """Boundary IoU per mask: IoU of the two masks' boundary bands, the band ``dilation_ratio`` of
    the image diagonal wide (at least 1 px). Unlike IoU it does not forgive poor outlines of large
    objects. (P, H, W) bool/0-1 -> (P,) float; two empty masks count as 1, one empty as 0."""
    h, w = pred.shape[-2:]
    width = max(1, int(round(dilation_ratio * (h * h + w * w) ** 0.5)))
    out = []
    for p, t in zip(pred.detach().bool().cpu().numpy(), target.detach().bool().cpu().numpy()):
        bp, bt = mask_boundary(p, width), mask_boundary(t, width)
        union = (bp | bt).sum()
        out.append((bp & bt).sum() / union if union else 1.0)
    return torch.tensor(out, dtype=torch.float32)
