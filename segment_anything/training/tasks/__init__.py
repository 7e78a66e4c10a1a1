"""Training modes behind one interface (base.Task): prompt, interactive, semantic."""

from .base import Task
from .interactive import InteractiveTask
from .prompt import PromptTask
from .semantic import SemanticTask, run_classes


def build_task(cfg, spec, data) -> Task:
    """The run's task (spec.task, from training.config's resolve); with --task semantic, its
    classes from the data (DataError on bad labels)."""
    if spec.task == "semantic":
        return SemanticTask(cfg, spec, run_classes(cfg, data))
    return InteractiveTask(cfg, spec) if spec.task == "interactive" else PromptTask(cfg, spec)


__all__ = ["InteractiveTask", "PromptTask", "SemanticTask", "Task", "build_task"]
