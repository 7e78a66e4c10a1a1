"""Training the way SAM was trained: mixed prompts, the minimum loss over the three
multimask outputs for single-point prompts, and rounds of simulated corrective clicks with the
previous low-resolution logits fed back as the mask prompt.

Everything random is drawn from numpy Generators seeded by numbers every process agrees on:
the prompt kind and point count of an object by (seed, epoch, image index, object), a random
click additionally by the round, and the number of click rounds of a step by (seed, epoch,
optimizer step within the epoch), so all ranks run the same rounds (no rank waits on a
collective another skips), every micro-batch of an accumulated step the step's, and
2 processes x batch B, 1 x 2B and 1 x B accumulating 2 train alike.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .clicks import next_clicks, to_input_frame
from .losses import LossSpec, ignore_at, low_res_pair
from .metrics import mask_dice, mask_iou
from .resize import resize_logits
from .trainable import grad_if_trained

PROMPT_KINDS = ("box", "point")
CLICK_MODES = ("center", "random")
CLICK_GRADS = ("all", "last")
MIXED_STREAM, CLICK_STREAM, ROUNDS_STREAM = 1, 2, 3  # keep the Generators of different choices apart


def parse_prompt_probs(text: str) -> Dict[str, float]:
    """'box=0.5,point=0.5' -> {'box': 0.5, 'point': 0.5}, normalised to sum 1; ValueError naming
    what is wrong."""
    probs: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in PROMPT_KINDS or not sep:
            raise ValueError(f"--prompt_probs takes box=P,point=Q (kinds {', '.join(PROMPT_KINDS)}), got {part!r}")
        try:
            probs[name] = float(value)
        except ValueError:
            raise ValueError(f"--prompt_probs: probability of {name!r} must be a number, got {value!r}") from None
        if not probs[name] >= 0:
            raise ValueError(f"--prompt_probs: probability of {name!r} must be >= 0, got {value!r}")
    total = sum(probs.values())
    if not total > 0:
        raise ValueError(f"--prompt_probs: no kind with a positive probability in {text!r}")
    return {k: probs.get(k, 0.0) / total for k in PROMPT_KINDS}


def parse_val_clicks(text: str) -> Tuple[int, ...]:
    """'1,3,5' -> (1, 3, 5); '' -> () (off)."""
    try:
        clicks = tuple(sorted({int(v) for v in str(text).split(",") if v.strip()}))
    except ValueError:
        raise ValueError(f"--val_clicks takes click counts like 1,3,5, got {text!r}") from None
    if clicks and clicks[0] < 1:
        raise ValueError(f"--val_clicks counts must be >= 1, got {text!r}")
    return clicks


@dataclass(frozen=True)
class InteractiveSpec:
    """What the interactive step does (training.config's resolve gives None when none of it is on)."""

    seed: int = 0
    mixed: Optional[Tuple[float, float]] = None  # (P(box), P(point)) per object; None: prompts as given
    num_points: int = 1  # mixed: an object's point prompt has 1..num_points positive points
    multimask: bool = True  # single-point prompts: the minimum loss over the three multimask outputs
    click_rounds: int = 0  # at most this many corrective clicks per step (drawn per step), then a mask-only round
    click_mode: str = "center"
    click_grad: str = "all"

    def rounds(self, epoch: int, step: int) -> int:
        """Corrective clicks of this step: uniform in 1..click_rounds from a Generator seeded by
        (seed, epoch, step) only, so every rank draws the same number (0 when clicks are off)."""
        if self.click_rounds == 0:
            return 0
        return int(np.random.default_rng([self.seed, epoch, step, ROUNDS_STREAM]).integers(1, self.click_rounds + 1))


# --- Prompts of one step ---


@dataclass
class Prompts:
    """Per-prompt state of one step, in the encoder's resized frame; P prompts, K point slots."""

    boxes: torch.Tensor  # (P, 4); rows of prompts without a box are ignored
    use_box: torch.Tensor  # (P,) bool
    points: torch.Tensor  # (P, K, 2)
    labels: torch.Tensor  # (P, K): 1 positive, 0 negative, -1 padding
    image_index: torch.Tensor  # (P,)

    def single_point(self) -> torch.Tensor:
        """(P,) bool: no box, one positive point and no other point."""
        return ~self.use_box & ((self.labels == 1).sum(1) == 1) & ((self.labels == 0).sum(1) == 0)

    def add_points(self, xy: torch.Tensor, labels: torch.Tensor) -> "Prompts":
        """A new point per prompt appended: xy (P, 2) resized frame, labels (P,) (-1: no click)."""
        return Prompts(self.boxes, self.use_box, torch.cat([self.points, xy[:, None]], 1),
                       torch.cat([self.labels, labels[:, None]], 1), self.image_index)


def mixed_choice(spec: InteractiveSpec, epoch: int, keys: Sequence[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Per object key (image index, object index): (use_box (P,) bool, positive points (P,) int
    in 1..num_points, meaningful where use_box is False), each from its object's own Generator."""
    use_box, count = np.zeros(len(keys), bool), np.ones(len(keys), np.int64)
    for j, (index, obj) in enumerate(keys):
        rng = np.random.default_rng([spec.seed, epoch, index, obj + 1, MIXED_STREAM])
        use_box[j] = rng.random() < spec.mixed[0]
        count[j] = rng.integers(1, max(spec.num_points, 1) + 1)
    return use_box, count


def step_prompts(batch, spec: InteractiveSpec, epoch: int, keys: Sequence[Tuple[int, int]]) -> Prompts:
    """The batch's prompts (utils.batch.Batch), with the mixed choice applied: a box object
    keeps only its box; a point object keeps its first k positive points (and its negatives)."""
    p = batch.image_index.numel()
    device = batch.image_index.device
    points = batch.points if batch.points is not None else torch.zeros(p, 0, 2, device=device)
    labels = batch.point_labels if batch.point_labels is not None else torch.zeros(p, 0, device=device)
    boxes = batch.boxes if batch.boxes is not None else torch.zeros(p, 4, device=device)
    use_box = torch.full((p,), batch.boxes is not None, device=device)
    if spec.mixed is not None:
        box_np, count = mixed_choice(spec, epoch, keys)
        use_box = torch.from_numpy(box_np).to(device)
        rank = torch.cumsum((labels == 1).long(), 1)  # 1-based rank of each positive point
        keep = (labels == 0) | ((labels == 1) & (rank <= torch.from_numpy(count).to(device)[:, None]))
        labels = torch.where(keep & ~use_box[:, None], labels, torch.full_like(labels, -1.0))
    return Prompts(boxes, use_box, points, labels, batch.image_index)


def decode_all(sam, embeddings: torch.Tensor, prompts: Prompts, mask_input: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """All four mask tokens of every prompt: logits (P, 4, 4g, 4g) and IoU predictions (P, 4).

    Every prompt is decoded with the tokens SamPredictor would give it at inference, whatever
    else shares the batch: its own points in order (padding slots and "no click" slots, label
    -1, left out), its box corners, or with no box one padding point. Prompts are grouped by
    (box or not, point count) and each group is one decoder call; a layout that depended on the
    other prompts of a batch would make a rank's result depend on how the batch was split. The
    decoder computes every token's mask in any case, so all its parameters are in the graph
    whichever masks reach the loss."""
    real = prompts.labels != -1
    # Each prompt's real points first, in their order (a stable sort on "is padding").
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
    points = prompts.points.gather(1, order[..., None].expand(-1, -1, 2))
    labels = prompts.labels.gather(1, order)
    count = real.sum(1)
    if bool(((count == 0) & ~prompts.use_box).any()):
        raise ValueError("a prompt has neither a box nor a point")
    outs, groups = [], []
    pe = sam.prompt_encoder.get_dense_pe()
    for with_box, n in sorted({(bool(b), int(c)) for b, c in zip(prompts.use_box.tolist(), count.tolist())}, reverse=True):
        idx = torch.nonzero((prompts.use_box == with_box) & (count == n)).flatten()
        pts = (points[idx, :n], labels[idx, :n]) if n else None
        sparse, dense = sam.prompt_encoder(points=pts, boxes=prompts.boxes[idx] if with_box else None,
                                           masks=None if mask_input is None else mask_input[idx])
        outs.append(sam.mask_decoder.predict_masks(embeddings, pe, sparse, dense, prompts.image_index[idx]))
        groups.append(idx)
    inverse = torch.argsort(torch.cat(groups))
    return torch.cat([o[0] for o in outs])[inverse], torch.cat([o[1] for o in outs])[inverse]


# --- The minimum loss over multimask outputs ---


def min_loss_select(terms: Dict[str, torch.Tensor], multimask: torch.Tensor, weights: Dict[str, float]
                    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Per prompt, the loss of one output token.

    terms: named (P, T) loss terms of every token (T = 4: single-mask token 0, then the three
    multimask tokens; 'loss' the weighted sum, 'loss_iou_head' if weighted). multimask: (P,)
    bool. A multimask prompt takes the multimask token with the lowest mask loss (the weighted
    sum without the IoU-head term), so only that mask gets gradient, while its IoU-head term is
    the mean over all three tokens (each against its own real IoU), as SAM trained. Other
    prompts take token 0. Returns ({name: (P,)}, chosen token (P,) long)."""
    t = terms["loss"].shape[1]
    head_w = weights.get("iou_head", 0.0)
    head = terms.get("loss_iou_head", torch.zeros_like(terms["loss"]))
    choice = torch.zeros(terms["loss"].shape[0], dtype=torch.long, device=terms["loss"].device)
    if t > 1 and multimask.any():
        mask_loss = (terms["loss"] - head_w * head)[:, 1:].detach()
        choice = torch.where(multimask, mask_loss.argmin(1) + 1, choice)
    out = {k: v.gather(1, choice[:, None])[:, 0] for k, v in terms.items()}
    if t > 1 and "loss_iou_head" in terms:
        all_three = head[:, 1:].mean(1)
        out["loss"] = torch.where(multimask, out["loss"] - head_w * out["loss_iou_head"] + head_w * all_three, out["loss"])
        out["loss_iou_head"] = torch.where(multimask, all_three, out["loss_iou_head"])
    return out, choice


def token_terms(sam, loss: LossSpec, low: torch.Tensor, iou: torch.Tensor, target: torch.Tensor,
                input_size, original_size, ignore: Optional[torch.Tensor] = None
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Loss terms of every token of one image's n prompts: low (n, T, L, L), iou (n, T),
    target (n, H, W), ignore: the image's pixels out of the loss, where the loss is computed.
    Returns ({name: (n, T)}, logits (n, T, h, w) and target (n, h, w) where the
    loss is computed: the original size, or the low-resolution grid with loss.size 'low_res')."""
    n, t = low.shape[:2]
    if loss.size == "low_res":
        logits, tgt = low_res_pair(low.float().flatten(0, 1), target.repeat_interleave(t, 0), input_size,
                                   sam.image_encoder.img_size)
    else:
        logits = resize_logits(low, input_size, original_size, sam.image_encoder.img_size).flatten(0, 1)
        tgt = target.repeat_interleave(t, 0)
    out = loss(logits, tgt, iou.flatten(), sam.mask_threshold, ignore)
    return {k: v.view(n, t) for k, v in out.items()}, logits.view(n, t, *logits.shape[-2:]), tgt.view(n, t, *tgt.shape[-2:])[:, 0]


def score_round(sam, loss: LossSpec, low: torch.Tensor, iou: torch.Tensor, batch, multimask: torch.Tensor
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """One round's per-prompt terms and metrics ({name: (P,)}), the chosen token (P,), and per
    image (chosen masks thresholded, target), both (n_i, h, w) bool at the loss's resolution."""
    tokens = slice(None) if multimask.any() else slice(0, 1)
    terms: Dict[str, List[torch.Tensor]] = {}
    choices, preds, start = [], [], 0
    for i, target in enumerate(batch.masks):
        n = target.shape[0]
        rows = slice(start, start + n)
        per_token, logits, truth = token_terms(sam, loss, low[rows, tokens], iou[rows, tokens], target,
                                        batch.input_sizes[i], batch.original_sizes[i],
                                        ignore_at(batch.ignore[i] if batch.ignore else None, low[rows], batch.input_sizes[i],
                                                  sam.image_encoder.img_size, loss.size))
        out, choice = min_loss_select(per_token, multimask[rows], dict(loss.weights))
        pred = logits.detach().gather(1, choice.view(n, 1, 1, 1).expand(-1, 1, *logits.shape[-2:]))[:, 0] > sam.mask_threshold
        out["iou"], out["dice"] = mask_iou(pred, truth), mask_dice(pred, truth)
        for k, v in out.items():
            terms.setdefault(k, []).append(v)
        choices.append(choice)
        preds.append((pred, truth.bool()))
        start += n
    return {k: torch.cat(v) for k, v in terms.items()}, torch.cat(choices), preds


# --- The step ---


def object_keys(items: Sequence[dict]) -> List[Tuple[int, int]]:
    """(image index, object index in its record) of every prompt of a batch's items."""
    keys = []
    for it in items:
        objects = it.get("objects")
        objects = range(len(it["masks"])) if objects is None else [int(o) for o in objects]
        keys += [(int(it["index"]), o) for o in objects]
    return keys


@dataclass
class Round:
    """What one round fed the decoder and what it chose (kept when InteractiveStep.keep_trace)."""

    mask_input: Optional[torch.Tensor]  # (P, 1, L, L) or None
    logits: torch.Tensor  # (P, 1, L, L) chosen token's low-resolution logits
    labels: torch.Tensor  # (P, K) point labels of the round


class InteractiveStep(nn.Module):
    """The module DDP wraps when interactive training is on (as utils.trainer.SamTrainStep
    otherwise): the first prediction, `rounds` corrective clicks, then one round with only the
    mask prompt. Returns per-prompt loss terms summed over the rounds that get gradient
    (click_grad all: every round; last: the last, the others run without gradient) and the
    first round's metrics (IoU, Dice with the prompt as given)."""

    def __init__(self, sam, spec: InteractiveSpec, loss: LossSpec) -> None:
        super().__init__()
        self.sam, self.spec, self.loss = sam, spec, loss
        self.keep_trace, self.trace = False, []  # tests: every round's mask prompt and output

    def forward(self, images: Optional[torch.Tensor], batch, keys: Sequence[Tuple[int, int]], epoch: int, rounds: int,
                embeddings: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """embeddings (B, C, g, g): from the embedding cache (the encoder is skipped), else from images."""
        sam, spec = self.sam, self.spec
        if embeddings is None:
            with grad_if_trained(sam.image_encoder):
                embeddings = sam.image_encoder(images)
        prompts = step_prompts(batch, spec, epoch, keys)
        multimask = prompts.single_point() & spec.multimask
        plan = ["first"] + ["click"] * rounds + (["mask_only"] if rounds else [])
        total: Dict[str, torch.Tensor] = {}
        mask_input, metrics = None, None
        self.trace = []
        for r, kind in enumerate(plan):
            with_grad = spec.click_grad == "all" or r == len(plan) - 1
            with torch.enable_grad() if with_grad else torch.no_grad():
                low, iou = decode_all(sam, embeddings, prompts, mask_input)
                terms, choice, preds = score_round(sam, self.loss, low, iou, batch, multimask & (r == 0))
            chosen = low.gather(1, choice.view(-1, 1, 1, 1).expand(-1, 1, *low.shape[-2:]))
            if self.keep_trace:
                self.trace.append(Round(mask_input, chosen.detach(), prompts.labels))
            if with_grad:
                for k in self.loss.keys():
                    total[k] = total[k] + terms[k] if k in total else terms[k]
            metrics = metrics or {k: terms[k] for k in ("iou", "dice")}
            if r + 1 < len(plan) and plan[r + 1] == "click":
                prompts = self._click(prompts, preds, batch, keys, epoch, r)
            mask_input = chosen.detach()  # the next round's mask prompt: this round's output logits
        total.update(metrics)
        total["loss"] = total["loss"] + self._touch()
        return total

    def _click(self, prompts: Prompts, preds: List[Tuple[torch.Tensor, torch.Tensor]], batch, keys, epoch: int, r: int) -> Prompts:
        """Prompts with one corrective click per object, placed from this round's masks."""
        frames = [tuple(p.shape[-2:]) for p, _ in preds]
        rngs = None
        if self.spec.click_mode == "random":
            rngs = [np.random.default_rng([self.spec.seed, epoch, i, o + 1, CLICK_STREAM, r]) for i, o in keys]
        xy, labels = next_clicks([p for p, _ in preds], [t for _, t in preds], self.spec.click_mode, rngs)
        xy_in = to_input_frame(xy, batch, frames, self.sam.image_encoder.img_size)
        return prompts.add_points(xy_in, torch.from_numpy(labels).to(xy_in.device))

    def _touch(self) -> torch.Tensor:
        """Zero times every trained prompt-encoder and decoder parameter: a step where some of
        them are outside the graph (no negative click on this rank, no box, no mask prompt)
        still gives each a (zero) gradient, so DDP's reducer never waits for one."""
        params = [p for m in (self.sam.prompt_encoder, self.sam.mask_decoder) for p in m.parameters() if p.requires_grad]
        if not params:
            return torch.zeros(())
        return sum(p.flatten()[0] for p in params) * 0.0
