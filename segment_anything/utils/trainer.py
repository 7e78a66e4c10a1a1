"""The training and validation step: what SamPredictor does, batched, with gradients for the decoder,
and THE loop over a task: train_one_epoch and evaluate.

A batch (utils.batch) holds the dataset items of one step, their prompts mapped into the
encoder's resized frame and their masks at each image's original size. The step normalises and
pads the images (Sam.preprocess), embeds them, encodes the prompts, decodes every prompt of every
image in one decoder call, brings the masks back to each image's original size (what
Sam.postprocess_masks computes, as two matrix products: utils.resize) and scores them there.

The loop is the same for every training mode; what differs (how items become a batch, the
forward that returns named loss terms, the meter) is the loop task's: PromptLoop and
InteractiveLoop here, SemanticLoop in utils.semantic_train.
"""

from contextlib import nullcontext
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modeling import Sam
from . import accumulate as accumulation
from .accumulate import global_count
from .batch import Batch, prepare_batch
from .click_eval import click_keys, click_metrics
from .data.cache import EmbeddingCache
from .distill import Anchor
from .distributed import get_world_size
from .interactive import InteractiveSpec, object_keys
from .losses import DEFAULT_LOSS_SPEC, LossSpec, ignore_at, low_res_pair
from .metrics import Meter, mask_dice, mask_iou
from .postprocess import clean_masks
from .resize import resize_logits
from .save_weight import unwrap_model
from .trainable import grad_if_trained, set_train_mode


class SamTrainStep(nn.Module):
    """The module that DistributedDataParallel wraps: its forward is the differentiable part
    of a training step, so calling the DDP wrapper runs DDP's forward and gradient hooks.
    `embeddings` keeps the last forward's image embeddings (the distillation term decodes its
    off-target prompts from them, with the encoder's gradient when it trains)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(
        self,
        images: torch.Tensor,
        boxes: Optional[torch.Tensor],
        image_index: torch.Tensor,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        embeddings: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: (B, 3, S, S) normalised, padded encoder inputs (unused with embeddings).
            boxes: (P, 4) xyxy box prompts in the resized frame, or None (points only).
            image_index: (P,) which image each prompt belongs to.
            points: (P, K, 2) xy point prompts in the resized frame, or None (boxes only).
            point_labels: (P, K) 1 positive, 0 negative, -1 padding (with points).
            embeddings: (B, C, g, g) image embeddings (from the cache): the encoder is skipped.
        Returns:
            low-resolution mask logits (P, 1, 4g, 4g) and IoU predictions (P, 1).
        """
        if embeddings is None:
            with grad_if_trained(self.sam.image_encoder):
                embeddings = self.sam.image_encoder(images)
        self.embeddings = embeddings
        return self.decode(embeddings, boxes, image_index, points, point_labels)

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: Optional[torch.Tensor],
        image_index: torch.Tensor,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every prompt of every image in one prompt-encoder and one decoder call;
        embeddings (B, C, g, g), the rest as in forward."""
        sam = self.sam
        with grad_if_trained(sam.prompt_encoder):
            sparse, dense = sam.prompt_encoder(
                points=(points, point_labels) if points is not None else None, boxes=boxes, masks=None
            )
        return sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            image_index=image_index,
        )


@torch.no_grad()
def batch_embeddings(sam: Sam, batch: Batch, cache: EmbeddingCache, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """(B, C, g, g) float32 embeddings: cached ones as stored, the others from one encoder call
    (frozen encoder, no grad; chunks of one image in the batch are encoded once), stored and
    rounded to the cache dtype exactly as a later hit will read them."""
    encoded = None
    if batch.images is not None:
        with autocast_context(batch.images.device, amp_dtype):
            encoded = sam.image_encoder(batch.images).float()
        stored = set()
        for key, row in zip(batch.cache_keys, batch.encode_rows):
            if row >= 0 and key is not None and row not in stored:
                cache.store(key, encoded[row])
                stored.add(row)
    out = [cache.round_trip(emb if row < 0 else encoded[row]) for emb, row in zip(batch.cached, batch.encode_rows)]
    # Both encoders return channels-last tensors; the decoder then picks the same kernels as
    # without the cache, so an fp32 cache trains bit for bit like no cache.
    return torch.stack(out).contiguous(memory_format=torch.channels_last)


def forward_step(model: nn.Module, sam: Sam, batch: Batch, cache: Optional[EmbeddingCache],
                 amp_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model call of a step: from embeddings (cache on) or from images (encoder inside)."""
    embeddings = batch_embeddings(sam, batch, cache, amp_dtype) if cache is not None else None
    with autocast_context(batch.image_index.device, amp_dtype):
        return model(batch.images, *batch.prompts(), embeddings=embeddings)


METRIC_KEYS = ("iou", "dice")  # of the thresholded mask; apart from the loss terms


POST_KEYS = ("iou_post", "dice_post")  # the same after clean_masks (--min_region_area)


def score(sam: Sam, batch: Batch, low_res: torch.Tensor, iou_pred: torch.Tensor, loss: LossSpec = DEFAULT_LOSS_SPEC,
          metrics_at_original: bool = False, min_region_area: int = 0) -> Dict[str, torch.Tensor]:
    """Per-prompt loss terms (loss.keys()) and metrics (METRIC_KEYS, plus POST_KEYS with a
    min_region_area); dict of (P,) tensors.

    The loss is computed at each image's original size, or on the low-resolution grid with
    loss.size == 'low_res'; metrics where the loss is, or at the original size when
    metrics_at_original (validation: comparable whatever the loss size).
    """
    terms: Dict[str, List[torch.Tensor]] = {}
    start, size = 0, sam.image_encoder.img_size
    for i, masks in enumerate(batch.masks):
        n = masks.shape[0]
        low, ious = low_res[start : start + n].float(), iou_pred[start : start + n, 0]
        full = None
        ignore = ignore_at(batch.ignore[i] if batch.ignore else None, low, batch.input_sizes[i], size, loss.size)
        if loss.size == "low_res":
            logits, target = low_res_pair(low[:, 0], masks, batch.input_sizes[i], size)
        else:
            full = logits = resize_logits(low[:, 0], batch.input_sizes[i], batch.original_sizes[i], size)
            target = masks
        out = loss(logits, target, ious, sam.mask_threshold, ignore)
        if metrics_at_original and full is None:
            full = resize_logits(low[:, 0], batch.input_sizes[i], batch.original_sizes[i], size)
        pred, truth = (full, masks) if full is not None else (logits, target)
        pred = pred.detach() > sam.mask_threshold
        out["iou"], out["dice"] = mask_iou(pred, truth), mask_dice(pred, truth)
        if min_region_area > 0:
            cleaned = clean_masks(pred, min_region_area)  # holes filled, islands removed, as the predictor's option
            out["iou_post"], out["dice_post"] = mask_iou(cleaned, truth), mask_dice(cleaned, truth)
        for key, value in out.items():
            terms.setdefault(key, []).append(value)
        start += n
    return {key: torch.cat(values) for key, values in terms.items()}


def step_loss(terms: Dict[str, torch.Tensor], device: torch.device, count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss to back-propagate: sum over this rank's prompts divided by the mean prompt
    count per rank. DDP averages gradients over ranks, so the result is the gradient of the
    mean over all prompts of the global batch, whatever the per-rank counts. count: the global
    prompt count when it is known already (accumulation: that of the whole group)."""
    if count is None:
        count = global_count(terms["loss"].numel(), device)  # stays a tensor: no host sync
    return terms["loss"].sum() * get_world_size() / count


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class PromptLoop:
    """The loop task of promptable masks (a box, points, or both per object): the model is the
    SamTrainStep (or its DDP wrapper); the meter averages loss terms and metrics per prompt.

    min_region_area and clicks concern validation only: IoU/Dice after clean_masks, and the IoU
    after that many corrective clicks (utils.click_eval). anchor (utils.distill): adds the
    loss's distill / l2sp terms, in training and validation alike."""

    def __init__(self, loss: LossSpec = DEFAULT_LOSS_SPEC, min_region_area: int = 0, clicks: Sequence[int] = (),
                 anchor: Optional[Anchor] = None) -> None:
        self.loss, self.min_region_area, self.clicks = loss, min_region_area, tuple(clicks)
        self.anchor = anchor

    def prepare(self, items: List[dict], sam: Sam, device: torch.device) -> Batch:
        return prepare_batch(items, sam, device)

    def train_meter(self) -> Meter:
        return Meter(self.loss.keys() + METRIC_KEYS)

    def train_step(self, model: nn.Module, sam: Sam, batch: Batch, items: List[dict], cache: Optional[EmbeddingCache],
                   amp_dtype: Optional[torch.dtype], epoch: int, step: int) -> Tuple[Dict[str, torch.Tensor], Any]:
        """(per-prompt loss terms and metrics, what the meter counts them by: the batch's images)."""
        low_res, iou_pred = forward_step(model, sam, batch, cache, amp_dtype)
        terms = score(sam, batch, low_res, iou_pred, self.loss)
        if self.anchor is not None:
            with autocast_context(batch.image_index.device, amp_dtype):
                terms = self.anchor.add_terms(terms, sam, batch, unwrap_model(model).embeddings)
        return terms, batch.num_images

    def eval_meter(self) -> Meter:
        post = POST_KEYS if self.min_region_area > 0 else ()
        return Meter(self.loss.keys() + METRIC_KEYS + post + tuple(click_keys(self.clicks)))

    def eval_step(self, sam: Sam, batch: Batch, items: List[dict], cache: Optional[EmbeddingCache],
                  amp_dtype: Optional[torch.dtype], last: Dict) -> Tuple[Dict[str, torch.Tensor], Any]:
        """Validation terms with the bare model. Without a cache, items that are chunks of one
        image (key `index` repeated) share one encoder pass (last: the previous batch's)."""
        device = batch.image_index.device
        if cache is not None:
            embeddings = batch_embeddings(sam, batch, cache, amp_dtype)
        else:
            with autocast_context(device, amp_dtype):
                embeddings = _embed_once(sam, batch, [it.get("index") for it in items], last)
        with autocast_context(device, amp_dtype):
            low_res, iou_pred = SamTrainStep(sam).decode(embeddings, *batch.prompts())
        terms = score(sam, batch, low_res, iou_pred, self.loss, metrics_at_original=True,
                      min_region_area=self.min_region_area)
        with autocast_context(device, amp_dtype):
            terms.update(click_metrics(sam, batch, embeddings, self.clicks))
            if self.anchor is not None:
                terms = self.anchor.add_terms(terms, sam, batch, embeddings)
        return terms, batch.num_images


class InteractiveLoop(PromptLoop):
    """The loop task of interactive training: the model is the InteractiveStep (or its DDP
    wrapper), called with the batch, its object keys and this optimizer step's click rounds (drawn
    from (seed, epoch, step within the epoch): the same on every rank and for every micro-batch of
    the step, so any split of the global batch into processes and accumulated micro-batches, and a
    run resumed mid-epoch, draw the same rounds). Validation as PromptLoop."""

    def __init__(self, spec: InteractiveSpec, loss: LossSpec = DEFAULT_LOSS_SPEC, min_region_area: int = 0,
                 clicks: Sequence[int] = ()) -> None:
        super().__init__(loss, min_region_area, clicks)
        self.spec = spec

    def train_step(self, model, sam, batch, items, cache, amp_dtype, epoch, step):
        # Every round decodes from the one set of embeddings.
        embeddings = batch_embeddings(sam, batch, cache, amp_dtype) if cache is not None else None
        with autocast_context(batch.image_index.device, amp_dtype):
            terms = model(batch.images, batch, object_keys(items), epoch, self.spec.rounds(epoch, step),
                          embeddings=embeddings)
        return terms, batch.num_images


def train_one_epoch(
    model: nn.Module,
    sam: Sam,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    loss_spec: LossSpec = DEFAULT_LOSS_SPEC,
    progress=None,
    accumulate: int = 1,
    guard=None,
    cache: Optional[EmbeddingCache] = None,
    interactive: Optional[InteractiveSpec] = None,
    epoch: int = 0,
    task=None,
    first_step: int = 0,
) -> Dict[str, float]:
    """One pass over this rank's shard. model is the DDP wrapper (or the bare step module).
    first_step: optimizer steps of this epoch trained before (a resumed run; the loader skips them).
    task: the loop task (PromptLoop, InteractiveLoop, utils.semantic_train.SemanticLoop); by
    default PromptLoop(loss_spec), or InteractiveLoop(interactive, loss_spec) with an InteractiveSpec.
    accumulate: micro-batches per optimizer step (see utils.accumulate).
    guard (faults.StepGuard): skips non-finite steps on every rank, saves and stops mid-epoch.
    With a cache, the step starts from embeddings (see batch_embeddings); the result then counts
    'cache_hits' (all ranks)."""
    if task is None:
        task = PromptLoop(loss_spec) if interactive is None else InteractiveLoop(interactive, loss_spec)
    set_train_mode(sam)
    meter = task.train_meter()
    if guard is not None:  # resumed mid-epoch: the sums of the batches before
        meter.sums = guard.take_resumed_sums()
    hits = 0
    for step, group in enumerate(accumulation.groups(loader, accumulate), start=first_step):
        batches = [task.prepare(items, sam, device) for items in group]
        count = global_count(sum(b.image_index.numel() for b in batches), device) if accumulate > 1 else None
        optimizer.zero_grad(set_to_none=True)
        sums_before = meter.sums
        for i, (items, batch) in enumerate(zip(group, batches)):
            with accumulation.sync_unless(model, last=i == len(batches) - 1):
                terms, counted_by = task.train_step(model, sam, batch, items, cache, amp_dtype, epoch, step)
                loss = step_loss(terms, device, count)
                scaler.scale(loss).backward()
            meter.add(terms, counted_by)
            hits += batch.num_cached
            if progress is not None:
                progress.step(batch.num_images * get_world_size(), loss)  # counts all ranks; reads the loss now and then
        if guard is None or guard.check(loss, optimizer, scaler):
            scaler.step(optimizer)
            scaler.update()
        else:
            meter.sums = sums_before  # a skipped step's non-finite terms stay out of the epoch means
        scheduler.step()
        if guard is not None:
            guard.end_step(meter.sums, terms)
    return dict(meter.reduce(device), cache_hits=int(global_count(hits, device).item()))


def _embed_once(sam: Sam, batch: Batch, keys: List, cache: Dict) -> torch.Tensor:
    """(B, C, g, g) embeddings for the batch's items, encoding each image once: validation
    splits an image with many objects into consecutive items (chunks) with the same key, which
    reuse the embedding of the item before them, in this batch or the last one."""
    source: List[int] = []  # per item: row of `fresh`, or -1 for the cached embedding
    fresh: List[int] = []
    for i, key in enumerate(keys):
        if key is not None and key == cache.get("key"):
            source.append(-1)
        elif key is not None and i > 0 and key == keys[i - 1]:
            source.append(source[-1])
        else:
            source.append(len(fresh))
            fresh.append(i)
    encoded = sam.image_encoder(batch.images[fresh]) if fresh else None
    rows = [cache["embedding"] if j < 0 else encoded[j] for j in source]
    cache.update(key=keys[-1], embedding=rows[-1])
    return torch.stack(rows)


@torch.no_grad()
def evaluate(
    sam: Sam, loader: Iterable, device: torch.device, amp_dtype: Optional[torch.dtype],
    loss_spec: LossSpec = DEFAULT_LOSS_SPEC, min_region_area: int = 0,
    cache: Optional[EmbeddingCache] = None, clicks: Sequence[int] = (), task=None, progress=None,
) -> Dict[str, float]:
    """Validation on this rank's shard with the bare model (no DDP forward, so no collective
    inside the loop and no deadlock when shards differ in length), then one global reduction.
    task: the loop task (default PromptLoop(loss_spec, min_region_area, clicks)); with an
    embedding cache, embeddings come from it (see batch_embeddings). progress: step(images) per batch."""
    if task is None:
        task = PromptLoop(loss_spec, min_region_area, clicks)
    sam.eval()
    meter = task.eval_meter()
    last: Dict = {}
    hits = 0
    for items in loader:
        batch = task.prepare(items, sam, device)
        terms, counted_by = task.eval_step(sam, batch, items, cache, amp_dtype, last)
        hits += batch.num_cached
        meter.add(terms, counted_by)
        if progress is not None:  # images, not chunks of one image's objects; all ranks, as rank 0 sees its own
            progress.step(sum(bool(it.get("first_chunk", True)) for it in items) * get_world_size())
    return dict(meter.reduce(device), cache_hits=int(global_count(hits, device).item()))
