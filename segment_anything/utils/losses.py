"""Segmentation losses as plain functions, combined by one function that names its terms."""

from typing import Dict

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask mean binary cross-entropy. logits, target: (P, H, W) -> (P,)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - sum(pg) / sum(p + g - pg) with p = sigmoid(logits), per mask. (P, H, W) -> (P,).
    eps keeps the ratio defined (and its gradient finite) for tiny masks."""
    p = torch.sigmoid(logits).flatten(1)
    g = target.flatten(1)
    inter = (p * g).sum(1)
    union = (p + g - p * g).sum(1)
    return 1.0 - (inter + eps) / (union + eps)


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


def sam_loss(
    logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor, iou_loss_weight: float = 1.0
) -> Dict[str, torch.Tensor]:
    """Per-mask loss terms for masks at one resolution.

    Args:
        logits: (P, H, W) mask logits; target: (P, H, W) in {0, 1}; iou_pred: (P,) IoU-head output.
    Returns:
        dict of (P,) tensors: 'bce', 'iou' (soft IoU loss), 'iou_mse' (IoU head vs the real IoU
        of the thresholded mask, so the head stays calibrated), 'total' (weighted sum) and the
        detached metric 'real_iou'.
    """
    logits, target = logits.float(), target.float()
    bce = bce_loss(logits, target)
    iou = soft_iou_loss(logits, target)
    real_iou = mask_iou(logits.detach() > 0, target)
    iou_mse = (iou_pred.float() - real_iou) ** 2
    total = bce + iou + iou_loss_weight * iou_mse
    return {"total": total, "bce": bce, "iou": iou, "iou_mse": iou_mse, "real_iou": real_iou}
