"""Samplers of the training loader: a DistributedSampler that can resume mid-epoch, the
wrapper that sends the epoch with every index into the DataLoader workers, and the batch sampler
that fills every rank's step with objects of the same estimated cost (--objects_per_step) with
its cost model."""

import bisect
import itertools
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DistributedSampler, Sampler

from ..transforms import ResizeLongestSide


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

# The cost model of a training step from cached embeddings (bench/object_cost.py measures it): an
# object costs its decoding (prompt encoder, two-way transformer, upscaling: the same for every
# object at one --image_size) plus a part that grows with the pixels where its loss is computed
# (the logits brought to the image's size, the loss there, both backwards). One decoding is worth
# the loss on DECODE_PIXELS x image_size^2 pixels (fewer than user CPU time alone gives: many
# objects of a large image in one step also cost system time for their fresh loss tensors, which
# no per-object cost follows exactly; docs/distributed.md has the measurements); a piece (an
# image's objects in one step) adds PIECE_COST objects' worth (its own prompt batch, loss loop and
# bookkeeping). Costs are integers in 1/COST_UNIT of one decoding, so the cuts are computed exactly.
COST_UNIT = 100
DECODE_PIXELS = 2.0
PIECE_COST = 0.5


def loss_pixels(size: Tuple[int, int], image_size: int, loss_size: str = "original") -> int:
    """Pixels of one object's loss for an image of size (H, W): H x W with --loss_size original,
    the image's crop of the low-resolution grid (image_size / 4 on the long side) with low_res."""
    if loss_size == "original":
        return int(size[0]) * int(size[1])
    h, w = ResizeLongestSide.get_preprocess_shape(int(size[0]), int(size[1]), image_size)
    return max(1, round(h / 4)) * max(1, round(w / 4))


def object_cost(size: Tuple[int, int], image_size: int, loss_size: str = "original",
                decode_pixels: float = DECODE_PIXELS) -> int:
    """One object's cost in a step (integer, COST_UNIT = one decoding) for an image of size (H, W);
    decode_pixels: what one decoding is worth in loss pixels, over image_size^2."""
    return COST_UNIT + round(COST_UNIT * loss_pixels(size, image_size, loss_size) / (decode_pixels * image_size ** 2))


def piece_cost() -> int:
    """What one piece adds to a step on top of its objects (integer, COST_UNIT = one decoding)."""
    return round(COST_UNIT * PIECE_COST)


class ObjectBatchSampler(Sampler):
    """Batches of about `objects_per_step` objects per rank, cut so that ranks do equal work.

    Per epoch, the images in the shuffled order (seed + epoch, the same permutation as
    ResumableSampler) lay their objects end to end in one stream, every object once. Each object
    has a cost (`costs`: one integer per image for each of its objects, e.g. object_cost; the
    first object of an image also carries `piece_cost`); without costs every object costs 1 and
    pieces nothing, and the cuts fall every objects_per_step objects exactly. The stream is cut
    where its running cost is nearest to multiples of the budget, objects_per_step x the mean
    cost of an object (piece costs included), so a micro-batch holds objects_per_step objects on
    average over the epoch: fewer of expensive objects, more of cheap ones, and every micro-batch
    holds at least one. Micro-batch k goes to rank k % world. An image thus lands whole in one
    micro-batch or is split across consecutive ones (as validation splits an image into chunks);
    a micro-batch holds at most one piece of each image. Only the last round of micro-batches is
    cut otherwise: what is left is shared among the ranks by cost. The number of rounds is
    counted in objects (ceil(objects / (world x objects_per_step)), the last joining the round
    before when it would hold fewer objects than ranks), so every rank has the same number of
    micro-batches in every epoch. The cuts do not depend on the world size; as their targets for
    2N are every other target for N, the ranks' micro-batches of one step, in rank order, hold the
    objects one process would train in that step with world * objects_per_step (except where a
    cut moves to keep micro-batches non-empty: an object costlier than a budget, or an epoch
    whose last objects are so costly that fewer objects than micro-batches would be left).

    Yields lists of dataset keys (image index, epoch, first object, end object); MaskDataset
    trains exactly those objects. set_epoch(epoch, start) skips the first `start` optimizer steps
    (start * accumulate micro-batches) without yielding them, for an exact mid-epoch resume.
    """

    def __init__(self, counts: Sequence[int], objects_per_step: int, accumulate: int = 1, num_replicas: int = 1,
                 rank: int = 0, shuffle: bool = True, seed: int = 0, costs: Optional[Sequence[int]] = None,
                 piece_cost: int = 0) -> None:
        if objects_per_step < 1 or accumulate < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"objects_per_step and accumulate must be >= 1 and 0 <= rank < num_replicas, got "
                             f"{objects_per_step}, {accumulate}, {rank}, {num_replicas}")
        self.counts = [int(c) for c in counts]
        self.costs = [1] * len(self.counts) if costs is None else [int(c) for c in costs]
        if len(self.costs) != len(self.counts) or min(self.costs, default=1) < 1 or piece_cost < 0:
            raise ValueError(f"costs must be one integer >= 1 per image and piece_cost >= 0, got {len(self.costs)} "
                             f"costs for {len(self.counts)} images, piece_cost {piece_cost}")
        self.piece_cost = int(piece_cost)
        self.objects_per_step = objects_per_step
        self.batch_size = objects_per_step  # the unit of a micro-batch is an object here (resume.py)
        self.accumulate, self.num_replicas, self.rank = accumulate, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = self.start = 0
        self.total = sum(self.counts)
        if self.total < 1:
            raise ValueError("the training set holds no objects")
        self.micro_batches = _rounds(self.total, objects_per_step, num_replicas)  # per rank per epoch
        self._bounds = {}  # epoch -> micro-batch bounds in the stream (the cuts depend on the order)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """start: optimizer steps of this epoch already trained (by every rank)."""
        self.epoch, self.start = epoch, start

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

    def _stream(self, epoch: int) -> Tuple[List[int], List[int], List[int]]:
        """The epoch's images with objects in order, the stream position where each ends, and the
        running cost at every object boundary (positions 0 .. total)."""
        order = [i for i in self.global_order(epoch) if self.counts[i] > 0]
        ends = list(itertools.accumulate(self.counts[i] for i in order))
        per_object = [self.costs[i] + (self.piece_cost if k == 0 else 0) for i in order for k in range(self.counts[i])]
        return order, ends, [0, *itertools.accumulate(per_object)]

    def bounds(self, epoch: int) -> List[int]:
        """Stream positions of the epoch's cuts, 0 first: micro-batch k is [bounds[k], bounds[k+1])."""
        if epoch not in self._bounds:
            self._bounds = {epoch: _cut(self._stream(epoch)[2], self.objects_per_step, self.num_replicas)}
        return self._bounds[epoch]

    def micro_batch_pieces(self, epoch: int) -> List[List[Piece]]:
        """Every rank's micro-batches of the epoch in the global order (micro-batch k is rank
        k % world's), each a list of pieces (image, first object, end object)."""
        order, ends, _ = self._stream(epoch)
        bounds = self.bounds(epoch)
        return [_pieces(order, ends, a, b) for a, b in zip(bounds, bounds[1:])]

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


def _rounds(total: int, per: int, world: int) -> int:
    """Rounds of micro-batches (world each) in an epoch of `total` objects: one per world x per
    objects, the last one joining the round before when it would hold fewer objects than ranks.
    Counted in objects, so every epoch has as many steps, whatever the costs and the order."""
    rounds = math.ceil(total / (per * world))
    if rounds > 1 and total - (rounds - 1) * per * world < world:
        rounds -= 1
    return rounds


def _nearest(running: List[int], scale: int, target: int, low: int, high: int) -> int:
    """The boundary j in [low, high] whose running[j] * scale is nearest to target (a tie goes to
    the later boundary); integers only, so equal targets give equal cuts."""
    j = bisect.bisect_left(running, -(-target // scale), low, high + 1)  # the first with running[j] * scale >= target
    j = min(max(j, low), high)
    if j > low and target - running[j - 1] * scale < running[j] * scale - target:
        j -= 1
    return j


def _cut(running: List[int], per: int, world: int) -> List[int]:
    """The epoch's cut positions (0 first, total last; _rounds x world micro-batches) in a stream
    of running costs (running[j]: the cost of the first j objects).

    Full rounds: cut k where the running cost is nearest to k x per x the mean object cost, at
    least one object after the cut before. The last round shares what is left among the ranks
    by cost. Should fewer objects than micro-batches be left for the rounds still to cut (an
    epoch whose end is far costlier than the mean), the rounds before are cut that way too, as
    many as it takes. With fewer objects than ranks in all, positions past the end wrap to the
    start (as DistributedSampler pads)."""
    total, cost = len(running) - 1, running[-1]
    rounds = _rounds(total, per, world)
    if total < world:  # one round of one object each, some objects twice
        return list(range(world + 1))
    bounds = [0]
    for k in range(1, (rounds - 1) * world + 1):
        bounds.append(_nearest(running, total, k * per * cost, bounds[-1] + 1, total))
    kept = rounds - 1
    while total - bounds[kept * world] < (rounds - kept) * world:
        kept -= 1
    bounds, parts = bounds[:kept * world + 1], (rounds - kept) * world
    first = bounds[-1]
    span = running[-1] - running[first]
    for r in range(1, parts):  # running cost nearest to first + r / parts of what is left
        bounds.append(_nearest(running, parts, running[first] * parts + r * span, bounds[-1] + 1, total - (parts - r)))
    return bounds + [total]


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
