"""Semantic segmentation: a K-class head on the image-encoder features (modeling/semantic_head.py);
step, loss and metrics in utils/semantic_train.py, data in utils/data/semantic.py."""

from typing import Dict, List, Sequence

import torch
from torch import nn

from ...modeling.semantic_head import attach_head
from ...utils.data.semantic import SemanticDataset, class_names
from ...utils.distributed import share_buffers
from ...utils.semantic_train import SemanticLoop, SemanticStep
from .base import Task

UNUSED_PARTS = ("prompt_encoder", "mask_decoder")  # the head replaces them: frozen, never in the graph


def run_classes(cfg, data) -> List[str]:
    """The class list of a run (all records, train and validation); DataError on bad labels."""
    return class_names(list(data.train) + list(data.val), cfg.num_classes)


class SemanticTask(Task):
    name = "semantic"
    sample_pictures = True  # samples.png: class maps, ground truth and prediction (training/writer.py)

    def __init__(self, cfg, spec, classes: Sequence[str]) -> None:
        super().__init__(cfg, spec)
        self.classes = list(classes)
        self.loop = self.val_loop = self.base_loop = SemanticLoop(self.loss, self.classes)

    def adapt_model(self, sam: nn.Module) -> None:
        """After --train froze/unfroze the parts: the head trains, the prompt path is frozen."""
        for part in UNUSED_PARTS:
            getattr(sam, part).requires_grad_(False)
        attach_head(sam, len(self.classes))

    def step_module(self, sam: nn.Module, device: torch.device, world_size: int) -> nn.Module:
        """On several CUDA ranks the head's BatchNorm is synchronised (SyncBatchNorm: statistics
        over the global batch); gloo on CPU has no SyncBatchNorm, so there each rank normalises
        with its own batch and DDP copies rank 0's running statistics."""
        if world_size > 1 and device.type == "cuda":
            sam.semantic_head = nn.SyncBatchNorm.convert_sync_batchnorm(sam.semantic_head)
        return SemanticStep(sam)

    def ddp_options(self, plan) -> Dict:
        # The head's BatchNorm trains: its running statistics follow rank 0's.
        return dict(super().ddp_options(plan), forward_sync_buffers=True)

    def after_train(self, sam: nn.Module, world_size: int) -> None:
        """Rank 0's BatchNorm running statistics on every rank. DDP copies them before each forward,
        but the forward then updates each rank's copy with its own batch: without this, every rank
        would validate a slightly different model, and none of them the one best.pth holds."""
        if world_size > 1:
            share_buffers(sam.semantic_head)

    def datasets(self, data, cache=None):
        return (SemanticDataset(data.train, self.cfg.image_size, self.classes, cache),
                SemanticDataset(data.val, self.cfg.image_size, self.classes, cache))

    def val_extra(self, val: Dict) -> Dict:
        """val_iou_<class> / val_dice_<class> (val_iou / val_dice being the class means)."""
        return {f"val_{kind}_{name}": val[f"{kind}_{name}"] for kind in ("iou", "dice") for name in self.classes}

    def metadata(self) -> Dict:
        """The predict tool rebuilds the head from these."""
        return {"task": "semantic", "classes": list(self.classes)}

    def describe(self, sam: nn.Module) -> str:
        head = sum(p.numel() for p in sam.semantic_head.parameters())
        loss = self.cfg.loss if self.cfg.loss != "bce=1,iou=1,iou_head=1" else "ce=1"
        return (f"task semantic: {len(self.classes)} classes ({', '.join(self.classes)}); head ({head:,} parameters, "
                f"all trained) on the image-encoder features (prompt encoder and mask decoder unused, frozen), loss {loss}")
