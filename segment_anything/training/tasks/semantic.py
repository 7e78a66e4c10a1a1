"""What engine.fit does differently with --task semantic, in one place, so the
engine keeps one `if semantic` per hook: classes, model, loaders, epoch records, metadata."""

import time
from typing import Dict, List, Sequence

import torch
from torch import nn

from ...modeling.semantic_head import attach_head
from ...utils.distributed import share_buffers
from ...utils.data.semantic import SemanticDataset, class_names
from ...utils.semantic_train import SemanticLoss, SemanticStep, evaluate_semantic, train_semantic_epoch

UNUSED_PARTS = ("prompt_encoder", "mask_decoder")  # the head replaces them: frozen, never in the graph


def is_semantic(cfg) -> bool:
    return getattr(cfg, "task", "prompt") == "semantic"


def run_classes(cfg, data) -> List[str]:
    """The class list of a run (all records, train and validation); DataError on bad labels."""
    return class_names(list(data.train) + list(data.val), cfg.num_classes)


def add_head(sam: nn.Module, classes: Sequence[str]) -> None:
    """After --train froze/unfroze the parts: the head trains, the prompt path is frozen."""
    for part in UNUSED_PARTS:
        getattr(sam, part).requires_grad_(False)
    attach_head(sam, len(classes))


def wrap_step(sam: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The module the step calls. On several CUDA ranks the head's BatchNorm is synchronised
    (SyncBatchNorm: statistics over the global batch); gloo on CPU has no SyncBatchNorm, so there
    each rank normalises with its own batch and DDP copies rank 0's running statistics."""
    if world_size > 1 and device.type == "cuda":
        sam.semantic_head = nn.SyncBatchNorm.convert_sync_batchnorm(sam.semantic_head)
    return SemanticStep(sam)


def share_statistics(head: nn.Module, world_size: int) -> None:
    """Rank 0's BatchNorm running statistics on every rank. DDP copies them before each forward,
    but the forward then updates each rank's copy with its own batch: without this, every rank
    would validate a slightly different model, and none of them the one best.pth holds."""
    if world_size > 1:
        share_buffers(head)


def make_datasets(cfg, data, classes, cache=None):
    return (SemanticDataset(data.train, cfg.image_size, classes, cache),
            SemanticDataset(data.val, cfg.image_size, classes, cache))


def _per_class(prefix: str, metrics: Dict, classes: Sequence[str]) -> Dict:
    return {f"{prefix}_{kind}_{name}": metrics[f"{kind}_{name}"] for kind in ("iou", "dice") for name in classes}


def run_epoch(run, info, train_loader, val_loader, sampler, guard, progress) -> Dict:
    """Train and validate one epoch; the metrics.jsonl record (engine.run_epoch's keys, val_iou /
    val_dice being the class means, plus val_iou_<class> / val_dice_<class>)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    train_m = train_semantic_epoch(run.model, run.sam, train_loader, run.optimizer, run.scheduler, run.scaler, info.device,
                                   run.amp_dtype, run.loss_spec, run.classes, progress=progress, accumulate=cfg.accumulate,
                                   guard=guard, cache=run.cache)
    progress.close()
    train_s = time.perf_counter() - t0
    share_statistics(run.sam.semantic_head, info.world_size)
    val_m = evaluate_semantic(run.sam, val_loader, info.device, run.amp_dtype, run.loss_spec, run.classes, cache=run.cache)
    record = {"epoch": run.epoch + 1, "train_loss": train_m["loss"], "train_iou": train_m["iou"],
              "val_loss": val_m["loss"], "val_iou": val_m["iou"], "val_dice": val_m["dice"],
              **{f"{s}_{k}": m[k] for s, m in (("train", train_m), ("val", val_m)) for k in run.loss_spec.keys()[1:]},
              **_per_class("val", val_m, run.classes),
              "images_per_sec": train_m["images"] / train_s, "seconds": time.perf_counter() - t0,
              "lr": run.scheduler.get_last_lr()[0], "skipped_steps": run.skipped, "_val": val_m}
    if run.cache is not None:
        record.update(cache_hits=train_m["cache_hits"], cache_misses=train_m["images"] - train_m["cache_hits"],
                      val_cache_hits=val_m["cache_hits"], val_cache_misses=val_m["images"] - val_m["cache_hits"])
    return record


def base_record(run, info, val_loader) -> Dict:
    """Epoch 0: the starting model (random head) on the validation set."""
    t0 = time.perf_counter()
    val_m = evaluate_semantic(run.sam, val_loader, info.device, run.amp_dtype, run.loss_spec, run.classes, cache=run.cache)
    return {"epoch": 0, "val_loss": val_m["loss"], "val_iou": val_m["iou"], "val_dice": val_m["dice"],
            **{f"val_{k}": val_m[k] for k in run.loss_spec.keys()[1:]}, **_per_class("val", val_m, run.classes),
            "seconds": time.perf_counter() - t0}


def metadata(classes: Sequence[str]) -> Dict:
    """best.pth entries beside the weights: the predict tool rebuilds the head from them."""
    return {"task": "semantic", "classes": list(classes)}


def describe(cfg, classes: Sequence[str], sam: nn.Module) -> str:
    head = sum(p.numel() for p in sam.semantic_head.parameters())
    return (f"task semantic: {len(classes)} classes ({', '.join(classes)}); head ({head:,} parameters, all trained) "
            f"on the image-encoder features (prompt encoder and mask decoder unused, frozen), "
            f"loss {cfg.loss if cfg.loss != 'bce=1,iou=1,iou_head=1' else 'ce=1'}")


__all__ = ["SemanticLoss", "add_head", "base_record", "describe", "is_semantic", "make_datasets", "metadata",
           "run_classes", "run_epoch", "wrap_step"]
