"""Interactive training (SAM's way): mixed prompts, the multimask minimum for single points and
corrective click rounds (utils.interactive); validation and records as the prompt task."""

from torch import nn

from ...utils.interactive import InteractiveSpec, InteractiveStep
from ...utils.trainer import InteractiveLoop
from .prompt import PromptTask


class InteractiveTask(PromptTask):
    name = "interactive"

    def __init__(self, cfg, spec: InteractiveSpec) -> None:
        super().__init__(cfg)
        self.spec = spec
        self.loop = InteractiveLoop(spec, self.loss)

    def step_module(self, sam, device, world_size) -> nn.Module:
        return InteractiveStep(sam, self.spec, self.loss)
