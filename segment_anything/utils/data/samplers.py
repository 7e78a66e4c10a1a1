"""Samplers of the training loader: a DistributedSampler that can resume mid-epoch, and the
wrapper that sends the epoch with every index into the DataLoader workers."""

import math
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DistributedSampler, Sampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `start` batches.

    The skipped indices are never yielded, so their samples are never loaded. The order is the
    parent's (seeded by seed + epoch), identical for every world size split.
    """

    def __init__(self, dataset, batch_size: int, accumulate: int = 1, **kw) -> None:
        super().__init__(dataset, **kw)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """start: optimizer steps of this epoch already trained (by every rank)."""
        super().set_epoch(epoch)
        self.start = start

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps: batches per epoch over --accumulate (the last group may be short)."""
        return math.ceil(math.ceil(self.num_samples / self.batch_size) / self.accumulate)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulate

    def global_order(self, epoch: int) -> List[int]:
        """An epoch's order over all ranks (before sharding), for the resume file."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist() if self.shuffle else list(range(len(self.dataset)))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start * self.samples_per_step:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start * self.samples_per_step, 0)


class EpochSampler(Sampler):
    """Wraps an index sampler (e.g. DistributedSampler) and yields (index, epoch) pairs, so the
    epoch travels with each index into DataLoader workers; set_epoch sets both."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int, **kw) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch, **kw)  # e.g. start= of a resumable sampler

    def __getattr__(self, name: str):
        """Anything else (steps_per_epoch, ...) is the wrapped sampler's."""
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        return ((int(i), epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
