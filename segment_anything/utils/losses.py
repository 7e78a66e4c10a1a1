"""Loss terms as plain functions, and one function that weights and names them (``--loss``).

Every term maps per-mask inputs to one value per mask: logits and targets are (P, H, W), the
result is (P,). Reductions over masks and ranks happen in the trainer (utils.trainer.step_loss).

An optional weight (P, H, W) in {0, 1} leaves pixels out of a term (tiled training's fragments of
objects trained in another tile, see data.tiling): they count neither as foreground nor as
background. Means are then over the counted pixels and the soft ratios sum over them only; a
weight of all ones gives exactly the unweighted value.
"""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .metrics import mask_iou

TERMS = ("bce", "focal", "dice", "iou", "iou_head")
DEFAULT_LOSS = "bce=1,iou=1,iou_head=1"
SMOOTH = 1.0  # added to numerator and denominator of the soft ratios: defined (and finite gradient) for empty masks


def _mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-mask mean of (P, H, W) values over the pixels the weight counts (all without one)."""
    if weight is None:
        return values.flatten(1).mean(1)
    return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1)


def _counted(t: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    return (t if weight is None else t * weight).flatten(1)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-mask mean binary cross-entropy. logits, target: (P, H, W) -> (P,)."""
    return _mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               weight: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    return _mean(loss, weight)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - (2 sum(pg) + s) / (sum(p) + sum(g) + s) with p = sigmoid(logits), per mask. (P, H, W) -> (P,)."""
    p = _counted(torch.sigmoid(logits), weight)
    g = _counted(target, weight)
    return 1.0 - (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = SMOOTH,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - (sum(pg) + eps) / (sum(p + g - pg) + eps) with p = sigmoid(logits), per mask. (P, H, W) -> (P,)."""
    p = _counted(torch.sigmoid(logits), weight)
    g = _counted(target, weight)
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
    ignore: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """The weighted loss and its named terms, per mask.

    Args:
        logits: (P, H, W) mask logits; target: (P, H, W) in {0, 1}; iou_pred: (P,) IoU-head output.
        weights: term name -> weight, from parse_loss.
        ignore: (H, W) or (P, H, W) in {0, 1}: pixels left out of every term (the IoU head's
            target included), except those of the mask's own target (see pixel_weight).
    Returns:
        dict of (P,) tensors: 'loss' (the weighted sum) and 'loss_<term>' for every named term
        (unweighted). iou_head's target is the IoU of the thresholded mask, as the predictor
        returns it, so the head learns to predict what users will see.
    """
    logits, target = logits.float(), target.float()
    w = pixel_weight(ignore, target)
    terms: Dict[str, torch.Tensor] = {}
    for name in weights:
        if name == "bce":
            value = bce_loss(logits, target, w)
        elif name == "focal":
            value = focal_loss(logits, target, focal_alpha, focal_gamma, w)
        elif name == "dice":
            value = dice_loss(logits, target, weight=w)
        elif name == "iou":
            value = soft_iou_loss(logits, target, weight=w)
        else:
            pred = logits.detach() > mask_threshold
            value = iou_head_loss(iou_pred, mask_iou(pred if w is None else pred & (w > 0), target))
        terms[f"loss_{name}"] = value
    total = sum(weights[name] * terms[f"loss_{name}"] for name in weights)
    return {"loss": total, **terms}


def pixel_weight(ignore: Optional[torch.Tensor], target: torch.Tensor) -> Optional[torch.Tensor]:
    """(P, H, W) float weight: 0 on ignored pixels, except where the target itself is foreground
    (objects may overlap: a pixel of the trained object is always counted); None without ignore."""
    if ignore is None:
        return None
    return 1.0 - ignore.float().expand_as(target) * (1.0 - target)


LOSS_SIZES = ("original", "low_res")
ANCHOR_TERMS = ("distill", "l2sp")  # LossSpec's weights of the terms that keep the starting model (utils.distill)


@dataclass(frozen=True)
class LossSpec:
    """What the trainer minimises: weighted terms, focal parameters, and the resolution it is
    computed at ('original': each image's own size; 'low_res': the decoder's 4x-embedding grid).

    distill and l2sp weigh the two terms that keep the starting model's behaviour (utils.distill;
    0 = off): they are not functions of the objects' masks, so the loop adds them after sam_loss."""

    weights: Mapping[str, float]
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    size: str = "original"
    distill: float = 0.0
    distill_prompts: int = 4  # off-target prompts per image with distill
    l2sp: float = 0.0

    def keys(self) -> Tuple[str, ...]:
        """The names sam_loss returns, then loss_distill and loss_l2sp when they are on."""
        anchors = tuple(f"loss_{name}" for name in ANCHOR_TERMS if getattr(self, name) > 0)
        return ("loss",) + tuple(f"loss_{name}" for name in self.weights) + anchors

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor,
                 mask_threshold: float = 0.0, ignore: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        return sam_loss(logits, target, iou_pred, self.weights, self.focal_alpha, self.focal_gamma, mask_threshold,
                        ignore)


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


def ignore_at(ignore: Optional[torch.Tensor], low: torch.Tensor, input_size: Tuple[int, int], image_size: int,
              size: str) -> Optional[torch.Tensor]:
    """An image's ignored pixels (H, W) where its loss is computed: as they are at the original
    size, or on the low-resolution grid of its logits low (..., L, L) the way low_res_pair brings
    the targets there; None stays None."""
    if ignore is None or size != "low_res":
        return ignore
    grid = low.reshape(-1, *low.shape[-2:])[:1].float()
    return low_res_pair(grid, ignore[None], input_size, image_size)[1][0]
