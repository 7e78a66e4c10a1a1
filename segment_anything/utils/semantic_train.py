"""Semantic mode's step, loss, metrics and loop task (SemanticLoop, for utils.trainer's loop).

The step: image-encoder features (from the encoder, or from the embedding cache when it is
frozen) -> sam.semantic_head -> (B, K, S, S) logits over the padded encoder input. The loss is
computed there, against the target resized (nearest) to the image's (h, w) and padded with -1
(ignored); validation scores at each image's original size, as the predict tool outputs.
Metrics are a global K x K confusion matrix (summed over ranks, then divided: no mean of means).
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.semantic_head import upsample_logits
from .distributed import all_reduce_sum
from .trainable import grad_if_trained
from .batch import Batch, images_to_encode
from .trainer import autocast_context, batch_embeddings, evaluate

TERMS = ("ce", "dice")
DEFAULT_LOSS = "ce=1"
SMOOTH = 1.0
IGNORE = -1  # target value of the padding around the resized image


def parse_loss(spec: str, prompt_default: str = "bce=1,iou=1,iou_head=1") -> Dict[str, float]:
    """'ce=1,dice=1' -> {'ce': 1.0, 'dice': 1.0}; the prompt mode's default --loss means ce=1."""
    spec = DEFAULT_LOSS if spec == prompt_default else spec
    weights: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        if name not in TERMS or name in weights:
            raise ValueError(f"--loss with --task semantic: terms are {', '.join(TERMS)} (each once), got {spec!r}")
        try:
            weights[name] = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"--loss: weight of {name!r} must be a number, got {value!r}") from None
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise ValueError(f"--loss: weight of {name!r} must be finite and >= 0, got {value!r}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"--loss: no term with a positive weight in {spec!r} (e.g. ce=1,dice=1)")
    return weights


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean cross-entropy over pixels whose target is not IGNORE.
    logits (B, K, H, W), target (B, H, W) int64 -> (B,)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    valid = (target != IGNORE).flatten(1).sum(1).clamp_min(1)
    return ce.flatten(1).sum(1) / valid


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Per-image soft multi-class Dice loss, 1 - mean over classes of (2 sum(pg) + s) / (sum(p) + sum(g) + s),
    p the softmax, g the one-hot target, over non-IGNORE pixels. (B, K, H, W), (B, H, W) -> (B,)."""
    k = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1).float()
    p = logits.float().softmax(1) * valid
    g = F.one_hot(target.clamp_min(0), k).permute(0, 3, 1, 2).float() * valid
    inter, total = (p * g).flatten(2).sum(2), (p + g).flatten(2).sum(2)
    return 1.0 - ((2 * inter + smooth) / (total + smooth)).mean(1)


@dataclass(frozen=True)
class SemanticLoss:
    weights: Mapping[str, float]

    def keys(self) -> Tuple[str, ...]:
        return ("loss",) + tuple(f"loss_{n}" for n in self.weights)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{'loss': weighted sum, 'loss_<term>': unweighted}, each (B,)."""
        fns = {"ce": ce_loss, "dice": dice_loss}
        terms = {f"loss_{n}": fns[n](logits, target) for n in self.weights}
        return {"loss": sum(w * terms[f"loss_{n}"] for n, w in self.weights.items()), **terms}


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted; IGNORE pixels left out."""
    keep = target != IGNORE
    return torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def class_scores(conf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU and Dice (K,) from a confusion matrix; NaN for a class absent from both
    prediction and truth (left out of the means)."""
    conf = conf.double()
    inter, truth, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = truth + pred - inter
    nan = torch.full_like(inter, float("nan"))
    iou = torch.where(union > 0, inter / union.clamp_min(1), nan)
    dice = torch.where(truth + pred > 0, 2 * inter / (truth + pred).clamp_min(1), nan)
    return iou, dice


class ClassMeter:
    """Epoch sums of per-image loss terms, the image count and the confusion matrix, in one
    float64 tensor (the fault guard and last.pth carry it as the prompt Meter's sums)."""

    def __init__(self, keys: Sequence[str], classes: Sequence[str]) -> None:
        self.keys, self.classes = list(keys), list(classes)
        self.sums: Optional[torch.Tensor] = None

    def add(self, terms: Dict[str, torch.Tensor], conf: torch.Tensor) -> None:
        ref = terms["loss"]
        step = torch.cat([torch.stack([terms[k].detach().double().sum() for k in self.keys]),
                          ref.new_tensor([float(ref.numel())], dtype=torch.float64), conf.double().flatten().to(ref.device)])
        self.sums = step if self.sums is None else self.sums + step

    def reduce(self, device: torch.device) -> Dict[str, float]:
        """Global means of the loss terms per image, 'iou'/'dice' (mean over the classes present),
        'iou_<class>'/'dice_<class>' (None when a class is absent), 'images'."""
        k, t = len(self.classes), len(self.keys)
        values = self.sums if self.sums is not None else torch.zeros(t + 1 + k * k, dtype=torch.float64)
        total = all_reduce_sum(values.to(device)).cpu()
        images = float(total[t])
        out = {key: float(v) / max(images, 1.0) for key, v in zip(self.keys, total[:t])}
        iou, dice = class_scores(total[t + 1:].reshape(k, k))
        out.update(iou=_mean(iou), dice=_mean(dice), images=int(images))
        for name, i, d in zip(self.classes, iou.tolist(), dice.tolist()):
            out[f"iou_{name}"], out[f"dice_{name}"] = _num(i), _num(d)
        return out


def _num(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


def _mean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if present.numel() else 0.0


class SemanticStep(nn.Module):
    """The module DDP wraps in semantic mode: (B, 3, S, S) images or (B, C, g, g) embeddings
    -> (B, K, S, S) logits."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images: Optional[torch.Tensor], embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        if embeddings is None:
            with grad_if_trained(self.sam.image_encoder):
                embeddings = self.sam.image_encoder(images)
        return self.sam.semantic_head(embeddings)


@dataclass
class SemanticBatch(Batch):
    targets: Optional[torch.Tensor] = None  # (B, S, S) int64 class ids, IGNORE outside each image


def prepare(items: List[dict], sam: nn.Module, device: torch.device) -> SemanticBatch:
    """A trainer Batch (images to encode, cached embeddings) with the (B, S, S) padded targets;
    one "prompt" per image (image_index 0..B-1), so the loop's counts are images."""
    size = sam.image_encoder.img_size
    cached = [it.get("embedding") for it in items]
    keys = [it.get("cache_key") for it in items]
    to_encode, rows = images_to_encode(items)
    images = torch.stack([sam.preprocess(im.to(device).float()) for im in to_encode]) if to_encode else None
    targets = torch.full((len(items), size, size), IGNORE, dtype=torch.int64)
    for i, it in enumerate(items):
        h, w = it["input_size"]
        targets[i, :h, :w] = F.interpolate(it["target"][None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return SemanticBatch(images=images, boxes=None, image_index=torch.arange(len(items), device=device), masks=[],
                         input_sizes=[tuple(it["input_size"]) for it in items],
                         original_sizes=[tuple(it["original_size"]) for it in items], new_images=len(items),
                         cached=[None if e is None else e.to(device) for e in cached], cache_keys=keys,
                         encode_rows=rows, num_cached=sum(e is not None for e in cached), targets=targets.to(device))


def logits_for(model: nn.Module, sam: nn.Module, batch: Batch, cache, amp_dtype) -> torch.Tensor:
    embeddings = batch_embeddings(sam, batch, cache, amp_dtype) if cache is not None else None
    with autocast_context(batch.image_index.device, amp_dtype):
        return model(batch.images, embeddings=embeddings).float()


class SemanticLoop:
    """The loop task of semantic segmentation (utils.trainer.train_one_epoch / evaluate): the model
    is the SemanticStep (or its DDP wrapper); the meter is a ClassMeter (loss terms per image and
    the confusion matrix). Training loss on the padded input frame; validation metrics at each
    image's original size, as the predict tool outputs."""

    def __init__(self, loss: SemanticLoss, classes: Sequence[str]) -> None:
        self.loss, self.classes = loss, list(classes)

    def prepare(self, items: List[dict], sam: nn.Module, device: torch.device) -> SemanticBatch:
        return prepare(items, sam, device)

    def train_meter(self) -> ClassMeter:
        return ClassMeter(self.loss.keys(), self.classes)

    eval_meter = train_meter

    def train_step(self, model, sam, batch: SemanticBatch, items, cache, amp_dtype, epoch: int, step: int):
        """(per-image loss terms, the step's confusion matrix)."""
        logits = logits_for(model, sam, batch, cache, amp_dtype)
        return self.loss(logits, batch.targets), confusion(logits.detach().argmax(1), batch.targets, len(self.classes))

    def eval_step(self, sam, batch: SemanticBatch, items, cache, amp_dtype, last: Dict):
        logits = logits_for(SemanticStep(sam), sam, batch, cache, amp_dtype)
        k = len(self.classes)
        conf = torch.zeros(k, k, dtype=torch.int64, device=batch.image_index.device)
        for i, it in enumerate(items):
            full = upsample_logits(logits[i : i + 1], it["input_size"], it["original_size"])[0]
            conf += confusion(full.argmax(0), it["target"].to(conf.device), k)
        return self.loss(logits, batch.targets), conf


def evaluate_semantic(sam, loader: Iterable, device, amp_dtype, loss_fn: SemanticLoss, classes: Sequence[str],
                      cache=None) -> Dict[str, float]:
    """utils.trainer.evaluate with the SemanticLoop: ClassMeter.reduce() plus 'cache_hits'."""
    return evaluate(sam, loader, device, amp_dtype, cache=cache, task=SemanticLoop(loss_fn, classes))
