"""Samplers of the training loader: a DistributedSampler that can resume mid-epoch, the
wrapper that sends the epoch with every index into the DataLoader workers, and the batch sampler
that fills every rank's step with the same number of objects (--objects_per_step)."""

import bisect
import itertools
import math
from typing import Iterator, List, Sequence, Tuple

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

    def images_left(self) -> int:
        """Samples still to come this epoch, all ranks (a progress total)."""
        return len(self) * self.num_replicas


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


Piece = Tuple[int, int, int]  # (image index, first object, end object): a slice of one image's objects


class ObjectBatchSampler(Sampler):
    """Batches of about `objects_per_step` objects per rank, for ranks that decode equal work.

    Per epoch, the images in the shuffled order (seed + epoch, the same permutation as
    ResumableSampler) lay their objects end to end in one stream, every object once. The stream
    is cut into micro-batches of exactly objects_per_step objects, dealt to the ranks in turn
    (micro-batch k to rank k % world). An image thus lands whole in one micro-batch or is split
    across consecutive ones (as validation splits an image into chunks); a micro-batch holds at
    most one piece of each image. Only the last round of micro-batches is cut otherwise: the
    objects left are shared evenly among the ranks (and joined with the round before when fewer
    objects than ranks are left), so every rank has the same number of micro-batches. The stream
    does not depend on the world size: the ranks' micro-batches of one step, in rank order, hold
    the objects one process would train in that step with world * objects_per_step.

    Yields lists of dataset keys (image index, epoch, first object, end object); MaskDataset
    trains exactly those objects. set_epoch(epoch, start) skips the first `start` optimizer steps
    (start * accumulate micro-batches) without yielding them, for an exact mid-epoch resume.
    """

    def __init__(self, counts: Sequence[int], objects_per_step: int, accumulate: int = 1, num_replicas: int = 1,
                 rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        if objects_per_step < 1 or accumulate < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"objects_per_step and accumulate must be >= 1 and 0 <= rank < num_replicas, got "
                             f"{objects_per_step}, {accumulate}, {rank}, {num_replicas}")
        self.counts = [int(c) for c in counts]
        self.batch_size = objects_per_step  # the unit of a micro-batch is an object here (resume.py)
        self.accumulate, self.num_replicas, self.rank = accumulate, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = self.start = 0
        self.total = sum(self.counts)
        if self.total < 1:
            raise ValueError("the training set holds no objects")
        self.sizes = _micro_batch_sizes(self.total, objects_per_step, num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """start: optimizer steps of this epoch already trained (by every rank)."""
        self.epoch, self.start = epoch, start

    @property
    def micro_batches(self) -> int:
        """Micro-batches per rank per epoch."""
        return len(self.sizes) // self.num_replicas

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches / self.accumulate)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulate

    def global_order(self, epoch: int) -> List[int]:
        """The epoch's image order (before the cut), for the resume file."""
        if not self.shuffle:
            return list(range(len(self.counts)))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(len(self.counts), generator=g).tolist()

    def micro_batch_pieces(self, epoch: int) -> List[List[Piece]]:
        """Every rank's micro-batches of the epoch in the global order (micro-batch k is rank
        k % world's), each a list of pieces (image, first object, end object)."""
        order = [i for i in self.global_order(epoch) if self.counts[i] > 0]
        ends = list(itertools.accumulate(self.counts[i] for i in order))
        out, position = [], 0
        for size in self.sizes:
            out.append(_pieces(order, ends, position, position + size))
            position += size
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int, int, int]]]:
        mine = self.micro_batch_pieces(self.epoch)[self.rank::self.num_replicas]
        for pieces in mine[self.start * self.accumulate:]:
            yield [(image, self.epoch, first, end) for image, first, end in pieces]

    def __len__(self) -> int:
        return max(self.micro_batches - self.start * self.accumulate, 0)

    def images_left(self) -> int:
        """Images that start in the micro-batches still to come, all ranks (a progress total)."""
        left = self.micro_batch_pieces(self.epoch)[self.start * self.accumulate * self.num_replicas:]
        return sum(1 for pieces in left for _, first, _ in pieces if first == 0)


def _micro_batch_sizes(total: int, per: int, world: int) -> List[int]:
    """Object counts of an epoch's micro-batches (a multiple of world of them): per each, the
    last round shared evenly; a last round with fewer objects than ranks joins the round before."""
    rounds = math.ceil(total / (per * world))
    if rounds > 1 and total - (rounds - 1) * per * world < world:
        rounds -= 1
    left = max(total - (rounds - 1) * per * world, world)  # fewer objects than ranks: some twice
    return [per] * ((rounds - 1) * world) + [left // world + (r < left % world) for r in range(world)]


def _pieces(order: List[int], ends: List[int], a: int, b: int) -> List[Piece]:
    """The pieces of stream positions [a, b). Positions past the end wrap to the start: only when
    the whole epoch holds fewer objects than ranks (as DistributedSampler pads)."""
    out, total = [], ends[-1]
    while a < b:
        position = a % total
        k = bisect.bisect_right(ends, position)
        begin = ends[k - 1] if k else 0
        stop = min(position + b - a, ends[k])
        out.append((order[k], position - begin, stop - begin))
        a += stop - position
    return out
