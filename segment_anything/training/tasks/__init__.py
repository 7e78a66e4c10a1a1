"""Training modes behind one interface (base.Task): prompt, interactive, semantic."""

from ...utils.interactive import InteractiveSpec
from .base import Task
from .interactive import InteractiveTask
from .prompt import PromptTask
from .semantic import SemanticTask, run_classes


def build_task(cfg, data) -> Task:
    """The run's task; with --task semantic, its classes from the data (DataError on bad labels)."""
    if cfg.task == "semantic":
        return SemanticTask(cfg, run_classes(cfg, data))
    spec = InteractiveSpec.from_config(cfg)
    return PromptTask(cfg) if spec is None else InteractiveTask(cfg, spec)


__all__ = ["InteractiveTask", "PromptTask", "SemanticTask", "Task", "build_task"]
