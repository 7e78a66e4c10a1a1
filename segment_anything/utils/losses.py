"""Loss terms as plain functions, and one function that weights and names them (``--loss``).

Every term maps per-mask inputs to one value per mask: logits and targets are (P, H, W), the
result is (P,). Reductions over masks and ranks happen in the trainer (utils.trainer.step_loss).
"""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F

from .metrics import mask_iou

TERMS = ("bce", "focal", "dice", "iou", "iou_head")
DEFAULT_LOSS = "bce=1,iou=1,iou_head=1"
SMOOTH = 1.0  # added to numerator and denominator of the soft ratios: defined (and finite gradient) for empty masks


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask mean binary cross-entropy. logits, target: (P, H, W) -> (P,)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask mean sigmoid focal loss (RetinaNet's, as SAM trained with).

    Per pixel: -a_t (1 - p_t)^gamma log(p_t), with p_t the probability of the true class and
    a_t = alpha for foreground, 1 - alpha for background (alpha < 0: no class weighting).
    (P, H, W) -> (P,).
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """1 - (2 sum(pg) + s) / (sum(p) + sum(g) + s) with p = sigmoid(logits), per mask. (P, H, W) -> (P,)."""
    p = torch.sigmoid(logits).flatten(1)
    g = target.flatten(1)
    return 1.0 - (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = SMOOTH) -> torch.Tensor:
    """1 - (sum(pg) + eps) / (sum(p + g - pg) + eps) with p = sigmoid(logits), per mask. (P, H, W) -> (P,)."""
    p = torch.sigmoid(logits).flatten(1)
    g = target.flatten(1)
    inter = (p * g).sum(1)
    union = (p + g - p * g).sum(1)
    return 1.0 - (inter + eps) / (union + eps)


def iou_head_loss(iou_pred: torch.Tensor, real_iou: torch.Tensor) -> torch.Tensor:
    """Squared error of the IoU head's prediction against the real IoU (a constant). (P,), (P,) -> (P,)."""
    return (iou_pred.float() - real_iou.detach().float()) ** 2


def parse_loss(spec: str) -> Dict[str, float]:
    """'bce=1,iou=1,iou_head=1' -> {'bce': 1.0, ...}; ValueError naming what is wrong."""
    weights: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in TERMS:
            raise ValueError(f"--loss: unknown term {name!r} in {spec!r}; terms are {', '.join(TERMS)}")
        if name in weights:
            raise ValueError(f"--loss: term {name!r} given twice in {spec!r}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"--loss: weight of {name!r} must be a number, got {value!r}") from None
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"--loss: weight of {name!r} must be finite and >= 0, got {value!r}")
        weights[name] = weight
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"--loss: no term with a positive weight in {spec!r} (e.g. {DEFAULT_LOSS})")
    return weights


def sam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    weights: Mapping[str, float],
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    mask_threshold: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """The weighted loss and its named terms, per mask.

    Args:
        logits: (P, H, W) mask logits; target: (P, H, W) in {0, 1}; iou_pred: (P,) IoU-head output.
        weights: term name -> weight, from parse_loss.
    Returns:
        dict of (P,) tensors: 'loss' (the weighted sum) and 'loss_<term>' for every named term
        (unweighted). iou_head's target is the IoU of the thresholded mask, as the predictor
        returns it, so the head learns to predict what users will see.
    """
    logits, target = logits.float(), target.float()
    terms: Dict[str, torch.Tensor] = {}
    for name in weights:
        if name == "bce":
            value = bce_loss(logits, target)
        elif name == "focal":
            value = focal_loss(logits, target, focal_alpha, focal_gamma)
        elif name == "dice":
            value = dice_loss(logits, target)
        elif name == "iou":
            value = soft_iou_loss(logits, target)
        else:
            value = iou_head_loss(iou_pred, mask_iou(logits.detach() > mask_threshold, target))
        terms[f"loss_{name}"] = value
    total = sum(weights[name] * terms[f"loss_{name}"] for name in weights)
    return {"loss": total, **terms}


LOSS_SIZES = ("original", "low_res")


@dataclass(frozen=True)
class LossSpec:
    """What the trainer minimises: weighted terms, focal parameters, and the resolution it is
    computed at ('original': each image's own size; 'low_res': the decoder's 4x-embedding grid)."""

    weights: Mapping[str, float]
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    size: str = "original"

    def keys(self) -> Tuple[str, ...]:
        """The names sam_loss returns."""
        return ("loss",) + tuple(f"loss_{name}" for name in self.weights)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor,
                 mask_threshold: float = 0.0) -> Dict[str, torch.Tensor]:
        return sam_loss(logits, target, iou_pred, self.weights, self.focal_alpha, self.focal_gamma, mask_threshold)


DEFAULT_LOSS_SPEC = LossSpec(parse_loss(DEFAULT_LOSS))


def low_res_pair(logits: torch.Tensor, masks: torch.Tensor, input_size: Tuple[int, int], image_size: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and target on the decoder's low-resolution grid, for --loss_size low_res.

    logits: (P, L, L) low-resolution logits over the padded image_size x image_size input;
    masks: (P, H, W) ground truth at the original size; input_size: (h, w) of the resized image
    inside the padded input. Returns logits cropped to the image's area, (P, l_h, l_w), and the
    target area-downsampled to that grid and thresholded at 0.5, (P, l_h, l_w) float in {0, 1}.
    """
    scale = logits.shape[-1] / image_size
    size = (max(1, round(input_size[0] * scale)), max(1, round(input_size[1] * scale)))
    target = F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]
    return logits[:, : size[0], : size[1]], (target >= 0.5).float()
