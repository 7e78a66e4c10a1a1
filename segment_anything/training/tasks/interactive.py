"""Interactive training (SAM's way): mixed prompts, the multimask minimum for single points and
corrective click rounds (utils.interactive); validation and records as the prompt task."""

from torch import nn

from ...utils.interactive import InteractiveStep
from ...utils.trainer import InteractiveLoop
from .prompt import PromptTask


class InteractiveTask(PromptTask):
    name = "interactive"

    def __init__(self, cfg, spec) -> None:
        super().__init__(cfg, spec)
        self.loop = InteractiveLoop(spec.interactive, self.loss)

    def step_module(self, sam, device, world_size) -> nn.Module:
        return InteractiveStep(sam, self.spec.interactive, self.loss)
