"""--compile: torch.compile of the per-step decoder work (prompt encoder + mask decoder).

With the embedding cache on, a training step is SamTrainStep.decode plus the loss; the frozen
encoder's embeddings come from disk. Only that method is compiled: the encoder runs at most once
per image (cold epoch) and the loss resizes masks to each image's own size, whose shapes change
with every image. The number of prompts per batch varies from step to step, so the graph is
compiled with dynamic shapes (one graph for every prompt count instead of one per count).

torch.compile is lazy: it compiles at the first call. A missing C++ compiler (inductor's CPU
backend needs one) is found before any worker starts (compile_errors, called by
TrainConfig.validate); any other compilation failure at the first call logs one warning and the
step runs eagerly, with the same results.
"""

import os
import shutil
from typing import Callable, List, Optional

import torch

from ..utils.log import get_logger


def cpu_compiler() -> Optional[str]:
    """The C++ compiler inductor's CPU backend would call ($CXX, else g++ / c++ / clang++), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def compile_errors(cfg) -> List[str]:
    """validate() messages for --compile (empty when it is off or usable)."""
    if not cfg.compile:
        return []
    errors = []
    if not hasattr(torch, "compile"):
        errors.append(f"--compile needs torch >= 2.0 (torch.compile), this is torch {torch.__version__}")
    wants_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if wants_cpu and cpu_compiler() is None:
        errors.append("--compile needs a C++ compiler on CPU (torch inductor builds its kernels with it): "
                      "install g++ or set CXX, or leave --compile off")
    if cfg.prompt == "mixed" or cfg.click_rounds > 0:
        errors.append("--compile covers the box/point step (SamTrainStep.decode); interactive training "
                      "(--prompt mixed, --click_rounds) runs eagerly: leave --compile off")
    return errors


class CompiledOrEager:
    """Calls torch.compile(fn, dynamic=True); if compiling fails, warns once and calls fn.

    A failure inside compilation leaves no side effects (the graph has not run), so the eager
    call that follows computes the step as if --compile were off. An error of the step itself
    (bad shapes) is raised again by the eager call."""

    def __init__(self, fn: Callable) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=True)
        self.failed: Optional[BaseException] = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, say why
                self.failed = err
                get_logger().warning("--compile: torch.compile failed (%s: %s); the decoder step runs eagerly",
                                     type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return self.eager(*args, **kwargs)


def compile_decode(step: torch.nn.Module) -> torch.nn.Module:
    """Compile step.decode in place (a SamTrainStep, before DDP wraps it) and return step.

    Compiling the inner method rather than the DDP wrapper keeps DDP's own forward and
    gradient hooks eager: the compiled graph's parameter gradients reach the same
    accumulation hooks, so gradients are still averaged across ranks."""
    if not hasattr(step, "decode"):  # InteractiveStep (multimask point prompts): its rounds stay eager
        get_logger().warning("--compile: %s is not compiled (only SamTrainStep.decode is)", type(step).__name__)
        return step
    step.decode = CompiledOrEager(step.decode)
    return step
