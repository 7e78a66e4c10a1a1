"""Keeping the starting model's behaviour while fine-tuning: the distillation term (--distill) and
L2-SP (--l2sp), two named loss terms beside the mask terms.

distill: a frozen copy of the starting prompt encoder and mask decoder decodes prompts that have
nothing to do with the training objects (random boxes and single points per image, drawn by the
dataset: data.prompts.off_target_prompts) from the image embeddings the step already has; the
tuned model decodes the same prompts with gradients. The term is the mean squared difference of
the two low-resolution logit maps over the image's own area of the grid (its padding is left
out), per prompt, averaged over the image's prompts. MSE on logits rather than a KL on
probabilities: the logits are what the decoder outputs and what the predictor thresholds, the
gradient never vanishes where both models are confident (a KL on saturated probabilities gives
almost none, so confident regions could drift unchecked), and it needs no temperature.

Where the base side's embeddings come from: with a frozen image encoder (the embedding cache's
case) they are the tuned side's, so the base costs one no-grad decoder call. When the encoder
trains, the base reads the starting encoder: with LoRA adapters as its only trained parameters,
the same encoder with the adapters switched off (no copy); otherwise a frozen copy of it. Either
is one more no-grad encoder pass per step.

l2sp: the squared distance of the trained parameters to their starting values (Li et al., "Explicit
inductive bias for transfer learning with convolutional networks", ICML 2018). With LoRA the
trained parameters are the adapter factors A and B, so it is their distance to their start (A's
seeded initialisation, B = 0), not the distance of the merged weight.

Both are per image (distill) or per step (l2sp); add_terms gives every prompt of an image its
image's distance and every prompt the l2sp value, so the terms are averaged and reduced across
ranks like the mask terms (trainer.step_loss): the gradient is the same for any world size.

The frozen copies live on the Anchor, never on the model: no state_dict, best.pth or last.pth
holds them, and a resumed run rebuilds them from the starting weights.
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modeling.lora import lora_layers
from .losses import LossSpec
from .transforms import ResizeLongestSide


@dataclass
class OffTarget:
    """A batch's off-target prompts in the resized frame: boxes first, then single points."""

    boxes: torch.Tensor  # (Qb, 4) xyxy
    points: torch.Tensor  # (Qp, 1, 2) xy, positive
    index: torch.Tensor  # (Qb + Qp,): the item each prompt belongs to


def off_target_batch(items: List[dict], transform: ResizeLongestSide, device: torch.device) -> Optional[OffTarget]:
    """The items' off_boxes / off_points (dataset with off_target > 0) mapped into the resized
    frame; None when the items carry none."""
    if "off_boxes" not in items[0]:
        return None
    boxes = torch.cat([transform.apply_boxes_torch(it["off_boxes"], it["original_size"]) for it in items])
    points = torch.cat([transform.apply_coords_torch(it["off_points"][:, None], it["original_size"]) for it in items])
    order = torch.arange(len(items))
    index = torch.cat([order.repeat_interleave(torch.tensor([len(it["off_boxes"]) for it in items])),
                       order.repeat_interleave(torch.tensor([len(it["off_points"]) for it in items]))])
    return OffTarget(boxes.to(device), points.to(device), index.to(device))


def decode_off_target(prompt_encoder: nn.Module, mask_decoder: nn.Module, embeddings: torch.Tensor,
                      off: OffTarget) -> torch.Tensor:
    """(Q, 1, L, L) low-resolution logits of the off-target prompts, in one decoder call: a box and
    a single point (with the padding point a box-less prompt gets) are both two sparse tokens."""
    labels = torch.ones(off.points.shape[:2], device=off.points.device)
    parts = [prompt_encoder(points=None, boxes=off.boxes, masks=None) if len(off.boxes) else None,
             prompt_encoder(points=(off.points, labels), boxes=None, masks=None) if len(off.points) else None]
    sparse = torch.cat([p[0] for p in parts if p is not None])
    dense = torch.cat([p[1] for p in parts if p is not None])
    low_res, _ = mask_decoder(image_embeddings=embeddings, image_pe=prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False, image_index=off.index)
    return low_res


def off_target_distance(tuned: torch.Tensor, base: torch.Tensor, index: torch.Tensor,
                        input_sizes: Sequence[Tuple[int, int]], image_size: int) -> torch.Tensor:
    """Per item: the mean over its prompts of the per-pixel mean squared logit difference inside
    the item's image area of the low-resolution grid (as losses.low_res_pair crops it).
    tuned, base: (Q, 1, L, L); index: (Q,) item of each prompt; input_sizes: (h, w) per item of
    the resized image inside the image_size x image_size input. Returns (len(input_sizes),)."""
    length = tuned.shape[-1]
    scale = length / image_size
    grid = torch.arange(length, device=tuned.device)
    limits = torch.tensor([[max(1, round(h * scale)), max(1, round(w * scale))] for h, w in input_sizes],
                          device=tuned.device)[index]
    inside = (grid[None, :, None] < limits[:, 0, None, None]) & (grid[None, None, :] < limits[:, 1, None, None])
    squared = (tuned[:, 0].float() - base[:, 0].float()) ** 2
    per_prompt = (squared * inside).sum((1, 2)) / inside.sum((1, 2))
    items = len(input_sizes)
    sums = per_prompt.new_zeros(items).index_add(0, index, per_prompt)
    counts = per_prompt.new_zeros(items).index_add(0, index, torch.ones_like(per_prompt))
    return sums / counts.clamp_min(1)


def l2sp_distance(model: nn.Module, start: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the named parameters in start of the squared distance to their start values (0-d)."""
    params = dict(model.named_parameters())
    total = torch.zeros((), device=next(iter(start.values())).device)
    for name, value in start.items():
        total = total + ((params[name].float() - value.float()) ** 2).sum()
    return total


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """The module's LoRA layers compute their base layer only (scaling 0) inside the block."""
    layers = list(lora_layers(module).values())
    saved = [layer.scaling for layer in layers]
    try:
        for layer in layers:
            layer.scaling = 0.0
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling = scaling


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval()


class Anchor:
    """What the two terms compare against: the starting prompt encoder and mask decoder (and image
    encoder, when it trains beyond LoRA) for distill, the trained parameters' start values for
    l2sp. capture() after what-trains is configured (LoRA added), before any step; to() with the model."""

    def __init__(self, loss: LossSpec) -> None:
        self.loss = loss
        self.prompt_encoder: Optional[nn.Module] = None
        self.mask_decoder: Optional[nn.Module] = None
        self.image_encoder: Optional[nn.Module] = None  # a frozen copy when the encoder trains beyond LoRA
        self.start: Dict[str, torch.Tensor] = {}

    def capture(self, sam: nn.Module) -> None:
        if self.loss.distill > 0:
            self.prompt_encoder, self.mask_decoder = frozen_copy(sam.prompt_encoder), frozen_copy(sam.mask_decoder)
            trained = [n for n, p in sam.image_encoder.named_parameters() if p.requires_grad]
            if any(not n.endswith((".lora_A", ".lora_B")) for n in trained):
                self.image_encoder = frozen_copy(sam.image_encoder)
        if self.loss.l2sp > 0:
            self.start = {n: p.detach().clone() for n, p in sam.named_parameters() if p.requires_grad}

    def to(self, device: torch.device) -> "Anchor":
        for name in ("prompt_encoder", "mask_decoder", "image_encoder"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self.start = {n: v.to(device) for n, v in self.start.items()}
        return self

    def base_embeddings(self, sam: nn.Module, images: Optional[torch.Tensor], tuned: torch.Tensor) -> torch.Tensor:
        """The starting encoder's embeddings of the batch (one row per item, as tuned), detached.

        With LoRA the pass runs with autograd on, as the tuned pass does (its graph is dropped at
        once): the kernels then match and the two sides are bit for bit equal at the start. A
        no-grad pass differs by rounding, and Adam scales that noise up to full-size steps on
        weights whose real gradient is zero (dead ReLU units), so runs would depend on the batch
        split."""
        if not any(p.requires_grad for p in sam.image_encoder.parameters()):
            return tuned.detach()
        if self.image_encoder is not None:
            with torch.no_grad():
                return self.image_encoder(images)
        with torch.enable_grad(), adapters_off(sam.image_encoder):
            return sam.image_encoder(images).detach()

    def add_terms(self, terms: Dict[str, torch.Tensor], sam: nn.Module, batch, embeddings: torch.Tensor
                  ) -> Dict[str, torch.Tensor]:
        """terms (per prompt, from trainer.score) with loss_distill / loss_l2sp added and weighted
        into 'loss'. batch: a trainer.Batch whose items carry off-target prompts (with distill);
        embeddings: the tuned model's, one row per item (with a gradient when the encoder trains)."""
        out = dict(terms)
        if self.loss.distill > 0:
            off = batch.off_target
            tuned = decode_off_target(sam.prompt_encoder, sam.mask_decoder, embeddings, off)
            with torch.no_grad():
                base = decode_off_target(self.prompt_encoder, self.mask_decoder,
                                         self.base_embeddings(sam, batch.images, embeddings), off)
            per_item = off_target_distance(tuned, base, off.index, batch.input_sizes, sam.image_encoder.img_size)
            out["loss_distill"] = per_item[batch.image_index]
            out["loss"] = out["loss"] + self.loss.distill * out["loss_distill"]
        if self.loss.l2sp > 0:
            out["loss_l2sp"] = l2sp_distance(sam, self.start).expand(batch.image_index.numel())
            out["loss"] = out["loss"] + self.loss.l2sp * out["loss_l2sp"]
        return out
