"""The task interface: what a training mode decides, so the engine and the loop never branch on it.

A task owns its datasets, the module the step calls (and the DDP options it needs), the loop
task that turns items into a batch and a batch into named loss terms and metrics (for
utils.trainer's one loop), the buffers to share after training, the epoch record, best.pth's
extra metadata and its start-up line. Implementations: prompt.PromptTask,
interactive.InteractiveTask, semantic.SemanticTask; build_task (tasks/__init__.py) picks one.
"""

from typing import Dict, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ...utils.data import RunData
from ...utils.trainable import TrainPlan


class Task:
    """Base of the three modes. loss (spec.loss; keys(): 'loss' then the named terms) is the run's. Subclasses set loop
    (the training loop task), val_loop and base_loop (validation after each epoch / of the
    starting model), and sample_pictures (whether samples.png is drawn)."""

    name = ""
    sample_pictures = True

    def __init__(self, cfg, spec) -> None:
        self.cfg, self.spec = cfg, spec  # the flags and their RunSpec (training.config)
        self.loss = spec.loss

    # --- the model and its step

    def adapt_model(self, sam: nn.Module) -> None:
        """After what-trains is configured, before the model moves to its device."""

    def step_module(self, sam: nn.Module, device: torch.device, world_size: int) -> nn.Module:
        raise NotImplementedError

    def ddp_options(self, plan: TrainPlan) -> Dict:
        # Buffers are synced on every forward only when they train (a training TinyViT's BatchNorm);
        # forward_sync_buffers is the new name of the deprecated broadcast_buffers.
        return dict(forward_sync_buffers=plan.broadcast_buffers, find_unused_parameters=plan.find_unused_parameters)

    def after_train(self, sam: nn.Module, world_size: int) -> None:
        """After an epoch's training, before validation: make every rank's model rank 0's."""

    # --- data

    def datasets(self, data: RunData, cache=None) -> Tuple[Dataset, Dataset]:
        raise NotImplementedError

    # --- records

    def val_extra(self, val: Dict) -> Dict:
        """The mode's own validation entries of a metrics.jsonl record."""
        return {}

    def epoch_record(self, epoch: int, train: Dict, val: Dict, train_seconds: float, seconds: float, lr: float,
                     skipped: int, cached: bool) -> Dict:
        """The metrics.jsonl line of a trained epoch (epoch counted from 1)."""
        terms = {f"{split}_{k}": m[k] for split, m in (("train", train), ("val", val)) for k in self.loss.keys()[1:]}
        record = {"epoch": epoch, "train_loss": train["loss"], "train_iou": train["iou"],
                  "val_loss": val["loss"], "val_iou": val["iou"], "val_dice": val["dice"], **terms, **self.val_extra(val),
                  "images_per_sec": train["images"] / train_seconds, "seconds": seconds, "lr": lr, "skipped_steps": skipped}
        if cached:  # global counts (all ranks); a miss is an encoder call and a store
            record.update(cache_hits=train["cache_hits"], cache_misses=train["images"] - train["cache_hits"],
                          val_cache_hits=val["cache_hits"], val_cache_misses=val["images"] - val["cache_hits"])
        return record

    def base_record(self, val: Dict, seconds: float) -> Dict:
        """Epoch 0's line: the starting model on the validation set."""
        return {"epoch": 0, "val_loss": val["loss"], "val_iou": val["iou"], "val_dice": val["dice"],
                **{f"val_{k}": val[k] for k in self.loss.keys()[1:]}, **self.val_extra(val), "seconds": seconds}

    def metadata(self) -> Dict:
        """best.pth entries beside the weights that the tools need to rebuild the model."""
        return {}

    def describe(self, sam: nn.Module) -> str:
        """The start-up log line of the mode."""
        raise NotImplementedError
