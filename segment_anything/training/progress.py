"""Rank 0's progress through an epoch's training and validation: a tqdm bar on a terminal, periodic plain log lines otherwise.

The loss shown is a device tensor read on the host (``.item()``, a synchronisation with the GPU)
only every ``every`` steps or ``interval`` seconds, never on every step, and only on rank 0.
"""

import sys
import time
from typing import Optional, TextIO

import torch
from tqdm import tqdm

from ..utils.log import get_logger


class Progress:
    """total: images in the epoch (all ranks); step() gets the images of one step (all ranks) and its loss."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every: int = 10, interval: float = 30.0,
                 terminal: Optional[bool] = None, stream: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.every, self.interval = max(every, 1), interval
        self.images = self.steps = 0
        self.start = self.last_line = time.perf_counter()
        self.loss: Optional[torch.Tensor] = None
        stream = stream or sys.stderr
        self.terminal = stream.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and self.terminal:
            # No carriage-return redraws when the output goes to a file or a pipe: plain lines instead.
            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True, file=stream)

    def step(self, images: int, loss: Optional[torch.Tensor] = None) -> None:
        if not self.enabled:
            return
        self.images += images
        self.steps += 1
        if loss is not None:
            self.loss = loss.detach()  # kept on the device: reading it now would wait for the GPU
        if self.bar is not None:
            self.bar.update(images)  # tqdm shows img/s itself
            if self.steps % self.every == 0 and self.loss is not None:
                self.bar.set_postfix(loss=f"{self.loss.item():.4f}", refresh=False)
        elif time.perf_counter() - self.last_line >= self.interval:
            self.last_line = time.perf_counter()
            get_logger().info(self.line())

    def line(self) -> str:
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        loss = f"{self.loss.item():.4f}" if self.loss is not None else "-"
        return f"{self.desc} | {self.images}/{self.total} img | loss {loss} | {rate:.1f} img/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def shard_images(loader) -> int:
    """Images in a validation loader's shard (a Subset of a dataset; a chunked MaskDataset counts
    each image once, not each chunk of its objects)."""
    dataset = loader.dataset
    indices = getattr(dataset, "indices", range(len(dataset)))
    chunks = getattr(getattr(dataset, "dataset", dataset), "chunks", None)
    return sum(1 for k in indices if chunks[k][1] == 0) if chunks is not None else len(indices)
