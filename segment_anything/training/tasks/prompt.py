"""Promptable masks (the default task): SAM's mask decoder answers a box, points, or both per object."""

from typing import Dict

from torch import nn

from ...utils.data.dataset import describe, make_datasets
from ...utils.distributed import share_buffers
from ...utils.trainer import POST_KEYS, PromptLoop, SamTrainStep
from .base import Task


class PromptTask(Task):
    name = "prompt"

    def __init__(self, cfg, spec) -> None:
        super().__init__(cfg, spec)
        self.loop = PromptLoop(self.loss)
        # After each epoch also the IoU after corrective clicks; the starting model without them.
        self.val_loop = PromptLoop(self.loss, cfg.min_region_area, spec.val_clicks)
        self.base_loop = PromptLoop(self.loss, cfg.min_region_area)

    def step_module(self, sam, device, world_size) -> nn.Module:
        return SamTrainStep(sam)

    def after_train(self, sam, world_size: int) -> None:
        if world_size > 1 and any(p.requires_grad for p in sam.image_encoder.parameters()):
            share_buffers(sam.image_encoder)  # a training TinyViT's BatchNorm statistics: rank 0's everywhere

    def datasets(self, data, cache=None):
        return make_datasets(self.cfg, data.train, data.val, cache=cache)

    def val_extra(self, val: Dict) -> Dict:
        return {**{f"val_{k}": val[k] for k in POST_KEYS if k in val},
                **{f"val_{k}": v for k, v in val.items() if k.endswith("_iou") and "_click" in k}}

    def describe(self, sam) -> str:
        return describe(self.cfg)
