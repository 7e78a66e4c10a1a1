"""Promptable masks (the default task): SAM's mask decoder answers a box, points, or both per object."""

from typing import Dict

from torch import nn

from ...utils.data.dataset import make_datasets
from ...utils.distill import Anchor
from ...utils.distributed import share_buffers
from ...utils.trainer import POST_KEYS, PromptLoop, SamTrainStep
from .base import Task


class PromptTask(Task):
    name = "prompt"

    def __init__(self, cfg, spec) -> None:
        super().__init__(cfg, spec)
        # --distill / --l2sp: the starting model's copies and values, captured in adapt_model.
        self.anchor = Anchor(self.loss) if self.loss.distill > 0 or self.loss.l2sp > 0 else None
        self.loop = PromptLoop(self.loss, anchor=self.anchor)
        # After each epoch also the IoU after corrective clicks; the starting model without them.
        self.val_loop = PromptLoop(self.loss, cfg.min_region_area, spec.val_clicks, anchor=self.anchor)
        self.base_loop = PromptLoop(self.loss, cfg.min_region_area, anchor=self.anchor)

    def adapt_model(self, sam) -> None:
        if self.anchor is not None:
            self.anchor.capture(sam)

    def step_module(self, sam, device, world_size) -> nn.Module:
        if self.anchor is not None:
            self.anchor.to(device)
        return SamTrainStep(sam)

    def after_train(self, sam, world_size: int) -> None:
        if world_size > 1 and any(p.requires_grad for p in sam.image_encoder.parameters()):
            share_buffers(sam.image_encoder)  # a training TinyViT's BatchNorm statistics: rank 0's everywhere

    def datasets(self, data, cache=None):
        return make_datasets(self.spec.datasets, data.train, data.val, cache=cache)

    def val_extra(self, val: Dict) -> Dict:
        return {**{f"val_{k}": val[k] for k in POST_KEYS if k in val},
                **{f"val_{k}": v for k, v in val.items() if k.endswith("_iou") and "_click" in k}}

    def describe(self, sam) -> str:
        """One start-up log line: prompts, the object bound, augmentation."""
        cfg, p = self.cfg, self.spec.datasets.prompts
        what = p.prompt
        if p.points_per_object:
            what += f" ({p.num_points} {p.point_mode} point(s)" + (f", {p.negative_points} negative" if p.negative_points else "") + ")"
        if cfg.prompt == "mixed":
            what = (f"mixed ({cfg.prompt_probs}): its box or 1..{cfg.num_points} {cfg.point_mode} positive point(s) "
                    f"per object; validation: box")
        per_step = (f"{cfg.objects_per_step} objects per process per step on average, cut at equal estimated cost "
                    "(every object once per epoch)"
                    if cfg.objects_per_step else f"at most {cfg.max_objects} objects per image per step")
        return (f"prompts: {what} per object; {per_step}, validation in chunks of "
                f"{cfg.max_objects}; augment: {cfg.augment or 'none'}; box jitter {cfg.box_jitter:g}")
