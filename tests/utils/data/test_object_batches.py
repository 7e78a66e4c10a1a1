"""ObjectBatchSampler (--objects_per_step): micro-batches of equal object counts, every object once
per epoch, one stream for any world size, exact mid-epoch restarts; and the dataset items of its
pieces."""

import pytest
import torch

from segment_anything.utils.data.dataset import MaskDataset
from segment_anything.utils.data.prompts import PromptConfig
from segment_anything.utils.data.samplers import ObjectBatchSampler
from test_dataset import DiscRecord

NUCLEI = [16, 19, 28, 32, 10, 179, 12, 10, 60, 22, 11, 41]  # objects per image of ../shared/data nuclei


def ranks(counts, per, world, epoch=0, accumulate=1, start=0, seed=3):
    """Every rank's micro-batches (lists of dataset keys) of one epoch."""
    out = []
    for rank in range(world):
        sampler = ObjectBatchSampler(counts, per, accumulate, num_replicas=world, rank=rank, seed=seed)
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


@pytest.mark.parametrize("per", [1, 7, 32, 64, 500])
def test_one_stream_for_any_world_size_every_object_once(per):
    one = ranks(NUCLEI, per, 1)
    every = [(i, o) for i, n in enumerate(NUCLEI) for o in range(n)]
    assert sorted(stream(one)) == every  # every object exactly once per epoch
    assert stream(ranks(NUCLEI, per, 1)) == stream(one)  # deterministic
    for world in (2, 3):
        split = ranks(NUCLEI, per, world)
        assert stream(split) == stream(one), world
        assert len({len(batches) for batches in split}) == 1  # every rank the same number of micro-batches
        for k in range(len(split[0])):
            sizes = [len(objects(batches[k])) for batches in split]
            if k < len(split[0]) - 1:
                assert sizes == [per] * world
            else:  # the last round shared evenly
                assert max(sizes) - min(sizes) <= 1
    # A micro-batch holds at most one piece of each image, pieces are never empty.
    for batch in one[0]:
        assert len({key[0] for key in batch}) == len(batch) and all(key[2] < key[3] for key in batch)
    assert stream(ranks(NUCLEI, per, 1, epoch=1)) != stream(one)  # a new order each epoch


def test_fewer_objects_than_ranks_every_rank_still_gets_a_micro_batch():
    assert ranks([1], 4, 2) == [[[(0, 0, 0, 1)]], [[(0, 0, 0, 1)]]]


def test_restart_mid_epoch_skips_exactly_the_steps_done():
    for accumulate in (1, 3):
        full = ranks(NUCLEI, 16, 2, epoch=2, accumulate=accumulate)
        sampler = ObjectBatchSampler(NUCLEI, 16, accumulate, num_replicas=2, rank=1, seed=3)
        assert sampler.steps_per_epoch == -(-len(full[1]) // accumulate)
        for start in range(sampler.steps_per_epoch + 1):
            later = ranks(NUCLEI, 16, 2, epoch=2, accumulate=accumulate, start=start)
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
