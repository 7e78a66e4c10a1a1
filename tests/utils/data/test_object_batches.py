"""ObjectBatchSampler (--objects_per_step): micro-batches of equal object counts (or equal cost
with per-object costs), every object once per epoch, one stream for any world size, exact
mid-epoch restarts; its cost model; and the dataset items of its pieces."""

import pytest
import torch

from segment_anything.utils.data.dataset import MaskDataset
from segment_anything.utils.data.prompts import PromptConfig
from segment_anything.utils.data.samplers import ObjectBatchSampler, loss_pixels, object_cost, piece_cost
from test_dataset import DiscRecord

NUCLEI = [16, 19, 28, 32, 10, 179, 12, 10, 60, 22, 11, 41]  # objects per image of ../shared/data nuclei
# Object costs of the same images' sizes (256 x 256, 360 x 360, one 520 x 696) as the cost model
# weighs them at 256 px, loss at the original size; the images cost 1 with costs=None.
NUCLEI_COSTS = [150, 150, 150, 150, 150, 376, 150, 150, 150, 199, 150, 150]


def ranks(counts, per, world, epoch=0, accumulate=1, start=0, seed=3, costs=None, piece=0):
    """Every rank's micro-batches (lists of dataset keys) of one epoch."""
    out = []
    for rank in range(world):
        sampler = ObjectBatchSampler(counts, per, accumulate, num_replicas=world, rank=rank, seed=seed, costs=costs,
                                     piece_cost=piece)
        sampler.set_epoch(epoch, start=start)
        out.append(list(sampler))
    return out


def objects(batch):
    return [(image, o) for image, _, first, end in batch for o in range(first, end)]


def stream(per_rank):
    """The ranks' micro-batches in step order, rank order within a step: the objects trained in turn."""
    return [obj for k in range(len(per_rank[0])) for batches in per_rank for obj in objects(batches[k])]


def test_a_hand_computed_cut():
    """Images of 3, 5 and 1 objects in order (no shuffling), 4 objects per micro-batch."""
    def cut(world):
        return [list(ObjectBatchSampler([3, 5, 1], 4, num_replicas=world, rank=r, shuffle=False)) for r in range(world)]

    assert cut(1) == [[[(0, 0, 0, 3), (1, 0, 0, 1)], [(1, 0, 1, 5)], [(2, 0, 0, 1)]]]
    # 2 ranks: one round of 8 would leave 1 object for 2 ranks, so the 9 are shared as 5 + 4.
    assert cut(2) == [[[(0, 0, 0, 3), (1, 0, 0, 2)]], [[(1, 0, 2, 5), (2, 0, 0, 1)]]]
    # 3 ranks: 9 objects in one round of 3 each.
    assert cut(3) == [[[(0, 0, 0, 3)]], [[(1, 0, 0, 3)]], [[(1, 0, 3, 5), (2, 0, 0, 1)]]]


def test_a_hand_computed_cut_by_cost():
    """Images of 2, 3 and 1 objects in order, objects costing 3, 1 and 2, a piece 1 more: the
    stream's object costs are 4 3 | 2 1 1 | 3 (running 0 4 7 9 10 11 14, mean 14 / 6), so a budget
    of 2 objects is 14 / 3 = 4.67."""
    def cut(per, world):
        return [list(ObjectBatchSampler([2, 3, 1], per, num_replicas=world, rank=r, shuffle=False, costs=[3, 1, 2],
                                        piece_cost=1)) for r in range(world)]

    # 1 rank, 3 micro-batches: cuts nearest 4.67 (4, after 1 object) and 9.33 (9, after 3); costs 4, 5, 5
    # (by counts alone they would be 7, 3, 4).
    assert cut(2, 1) == [[[(0, 0, 0, 1)], [(0, 0, 1, 2), (1, 0, 0, 1)], [(1, 0, 1, 3), (2, 0, 0, 1)]]]
    # 2 ranks: one full round (cuts after 1 and 3 objects, as above), the last round's cost 14 - 9 = 5
    # shared as 2 + 3 (the cut nearest 9 + 2.5 is at 11, after 5 objects).
    assert cut(2, 2) == [[[(0, 0, 0, 1)], [(1, 0, 1, 3)]], [[(0, 0, 1, 2), (1, 0, 0, 1)], [(2, 0, 0, 1)]]]
    # 1 rank x 4 objects: its cut (nearest 9.33) is the 2-object cut 2 above: 2 ranks x 2 train as 1 x 4.
    assert cut(4, 1) == [[[(0, 0, 0, 2), (1, 0, 0, 1)], [(1, 0, 1, 3), (2, 0, 0, 1)]]]


def test_no_micro_batch_is_left_empty_by_costly_objects():
    """Four objects of cost 1, then one of 46 (a budget of 1 object is 50 / 5 = 10): the cuts that
    would fall inside the costly object move on, and the rounds before share what is left, so
    every micro-batch holds at least one object and every rank has as many."""
    def cut(world):
        return [list(ObjectBatchSampler([4, 1], 1, num_replicas=world, rank=r, shuffle=False, costs=[1, 46]))
                for r in range(world)]

    assert cut(1) == [[[(0, 0, 0, 1)], [(0, 0, 1, 2)], [(0, 0, 2, 3)], [(0, 0, 3, 4)], [(1, 0, 0, 1)]]]
    # 2 ranks, 2 rounds (a third would hold 1 object): the first cut nearest 12.5 but leaving 3 objects.
    assert cut(2) == [[[(0, 0, 0, 2)], [(0, 0, 3, 4)]], [[(0, 0, 2, 3)], [(1, 0, 0, 1)]]]


def test_cost_model_by_hand():
    """Pixels where the loss is: H x W at the original size; on the low-resolution grid the image's
    crop of it (520 x 696 at 256 px: resized to 191 x 256, grid 48 x 64)."""
    assert loss_pixels((520, 696), 256, "original") == 361920
    assert loss_pixels((520, 696), 256, "low_res") == 48 * 64
    assert loss_pixels((256, 256), 256, "low_res") == 64 * 64
    # One decoding (100) is worth the loss on 2 x 256^2 pixels: 100 + 100 x pixels / 131072.
    assert [object_cost(size, 256, "original") for size in [(256, 256), (360, 360), (520, 696)]] == [150, 199, 376]
    assert [object_cost(size, 256, "low_res") for size in [(256, 256), (520, 696)]] == [103, 102]
    assert object_cost((520, 696), 256, "original", decode_pixels=4) == 100 + 138
    assert piece_cost() == 50


def test_cut_by_cost_balances_the_nuclei_steps():
    """With the model's costs (the 520 x 696 image's objects 2.5 times a 256 x 256 image's), every
    full micro-batch's cost is within one object's cost of the budget; by counts alone, micro-batches
    holding the large image's objects cost far more."""
    piece = piece_cost()
    cost_of = {i: NUCLEI_COSTS[i] for i in range(len(NUCLEI))}
    budget = 37 * (sum(n * c for n, c in zip(NUCLEI, NUCLEI_COSTS)) + piece * len(NUCLEI)) / sum(NUCLEI)
    largest = max(NUCLEI_COSTS) + piece
    for costs, within in ((NUCLEI_COSTS, True), (None, False)):
        sampler = ObjectBatchSampler(NUCLEI, 37, num_replicas=2, seed=3, costs=costs, piece_cost=piece if costs else 0)
        batches = sampler.micro_batch_pieces(0)
        spent = [sum((end - first) * cost_of[image] + piece * (first == 0) for image, first, end in batch)
                 for batch in batches[:-2]]  # the full rounds (the last round shares what is left)
        assert (max(abs(c - budget) for c in spent) <= largest) == within


@pytest.mark.parametrize("per", [1, 7, 32, 64, 500])
@pytest.mark.parametrize("costs", [None, NUCLEI_COSTS])
def test_one_stream_for_any_world_size_every_object_once(per, costs):
    piece = 50 if costs else 0
    one = ranks(NUCLEI, per, 1, costs=costs, piece=piece)
    every = [(i, o) for i, n in enumerate(NUCLEI) for o in range(n)]
    assert sorted(stream(one)) == every  # every object exactly once per epoch
    assert stream(ranks(NUCLEI, per, 1, costs=costs, piece=piece)) == stream(one)  # deterministic
    for world in (2, 3):
        split = ranks(NUCLEI, per, world, costs=costs, piece=piece)
        assert stream(split) == stream(one), world
        assert len({len(batches) for batches in split}) == 1  # every rank the same number of micro-batches
        assert len(split[0]) == len(ranks(NUCLEI, per, world)[0])  # counted in objects, whatever the costs
        if costs is None:
            for k in range(len(split[0])):
                sizes = [len(objects(batches[k])) for batches in split]
                if k < len(split[0]) - 1:
                    assert sizes == [per] * world
                else:  # the last round shared evenly
                    assert max(sizes) - min(sizes) <= 1
        # world x per on one rank: the same objects in every step (the steps' micro-batches joined),
        # but for the last round, which may join the round before on one side only. Not with 1 object
        # per micro-batch and costs: there every micro-batch must hold exactly 1, so no cut falls by cost.
        if per == 1 and costs:
            continue
        joined = ranks(NUCLEI, per * world, 1, costs=costs, piece=piece)[0]
        steps = len(split[0]) - 1
        assert [objects(batch) for batch in joined[:steps]] == [
            [obj for batches in split for obj in objects(batches[k])] for k in range(steps)]
    # A micro-batch holds at most one piece of each image, pieces are never empty.
    for batch in one[0]:
        assert len({key[0] for key in batch}) == len(batch) and all(key[2] < key[3] for key in batch)
    assert stream(ranks(NUCLEI, per, 1, epoch=1)) != stream(one)  # a new order each epoch


def test_fewer_objects_than_ranks_every_rank_still_gets_a_micro_batch():
    assert ranks([1], 4, 2) == [[[(0, 0, 0, 1)]], [[(0, 0, 0, 1)]]]


@pytest.mark.parametrize("costs", [None, NUCLEI_COSTS])
def test_restart_mid_epoch_skips_exactly_the_steps_done(costs):
    piece = 50 if costs else 0
    for accumulate in (1, 3):
        full = ranks(NUCLEI, 16, 2, epoch=2, accumulate=accumulate, costs=costs, piece=piece)
        sampler = ObjectBatchSampler(NUCLEI, 16, accumulate, num_replicas=2, rank=1, seed=3, costs=costs,
                                     piece_cost=piece)
        assert sampler.steps_per_epoch == -(-len(full[1]) // accumulate)
        for start in range(sampler.steps_per_epoch + 1):
            later = ranks(NUCLEI, 16, 2, epoch=2, accumulate=accumulate, start=start, costs=costs, piece=piece)
            assert later == [batches[start * accumulate:] for batches in full]
            sampler.set_epoch(2, start=start)
            assert len(sampler) == len(later[1])
            assert sampler.images_left() == sum(first == 0 for batches in later for batch in batches
                                                for _, _, first, _ in batch)
        sampler.set_epoch(2)
        assert sampler.images_left() == len(NUCLEI)  # each image counted once, where its first object is


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="objects_per_step"):
        ObjectBatchSampler(NUCLEI, 0)
    with pytest.raises(ValueError, match="no objects"):
        ObjectBatchSampler([0, 0], 4)
    with pytest.raises(ValueError, match="costs"):
        ObjectBatchSampler(NUCLEI, 4, costs=[1, 2])
    with pytest.raises(ValueError, match="costs"):
        ObjectBatchSampler(NUCLEI, 4, costs=[0] * len(NUCLEI))


@pytest.mark.parametrize("augment", [(), ("flip", "rot90")])
def test_a_piece_is_those_objects_with_the_whole_images_prompts_and_augmentation(augment):
    record = DiscRecord(image="d.png", size=(60, 80), source="d", categories=("object",) * 5, n=5, seed=2)
    dataset = MaskDataset([record, record], 64, PromptConfig(prompt="box+point", num_points=2), max_objects=16,
                          augment=augment, seed=1, train=True)
    whole = dataset[(1, 2)]
    assert len(whole["masks"]) == 5
    first, rest = dataset[(1, 2, 0, 2)], dataset[(1, 2, 2, 5)]
    assert first["first_chunk"] and not rest["first_chunk"]
    assert first["objects"].tolist() == [0, 1] and rest["objects"].tolist() == [2, 3, 4]
    for key in ("masks", "boxes", "points", "point_labels"):
        assert torch.equal(torch.cat([first[key], rest[key]]), whole[key]), key
    assert torch.equal(first["image"], whole["image"]) and torch.equal(rest["image"], whole["image"])
    assert dataset.object_counts() == [5, 5]
