"""Gradient accumulation (--accumulate K): K micro-batches per optimizer step.

The loss of each micro-batch is its prompts' summed loss divided by the prompt count of the
whole group on all ranks (known up front: the group's batches are prepared before the first
forward), so K micro-batches of B images give exactly the gradient of one batch of K*B.
DDP all-reduces gradients only on the group's last backward pass (no_sync on the others).
"""

from contextlib import nullcontext
from typing import Iterable, Iterator, List, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .distributed import all_reduce_sum

T = TypeVar("T")


def groups(loader: Iterable[T], k: int) -> Iterator[List[T]]:
    """Consecutive lists of k loader batches; the last may be shorter."""
    group: List[T] = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def global_count(local: int, device: torch.device) -> torch.Tensor:
    """The sum of local over ranks, as a 0-d tensor on device (no host sync)."""
    return all_reduce_sum(torch.tensor([float(local)], device=device))[0]


def sync_unless(model: nn.Module, last: bool):
    """DDP's no_sync() for every micro-batch but the group's last; nothing for a bare module."""
    if last or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()
