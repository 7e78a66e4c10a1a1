"""The Dataset over Records: object subsets, seeded randomness through DataLoader workers, chunks."""

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from segment_anything.utils.data import collate
from segment_anything.utils.data.dataset import MaskDataset
from segment_anything.utils.data.samplers import EpochSampler
from segment_anything.utils.data.prompts import PromptConfig, mask_to_box
from segment_anything.utils.data.records import Record
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass(frozen=True)
class DiscRecord(Record):
    """n discs on a grid, drawn on demand; picklable (crosses into DataLoader workers)."""

    n: int = 1
    seed: int = 0

    def _discs(self):
        h, w = self.size
        rng = np.random.default_rng(self.seed)
        cols = int(np.ceil(np.sqrt(self.n)))
        cell = min(h, w) // cols
        return [(int(c * cell + cell // 2), int(r * cell + cell // 2), max(cell // 3, 2))
                for r, c in (divmod(k, cols) for k in range(self.n))], rng

    def load_image(self):
        h, w = self.size
        image = np.random.default_rng(self.seed).integers(0, 80, (h, w, 3), dtype=np.uint8)
        for x, y, r in self._discs()[0]:
            cv2.circle(image, (x, y), r, (200, 120, 40), -1)
        return image

    def load_masks(self, indices=None):
        discs = self._discs()[0]
        indices = range(self.n) if indices is None else indices
        out = np.zeros((len(indices), *self.size), np.uint8)
        for j, k in enumerate(indices):
            x, y, r = discs[k]
            cv2.circle(out[j], (x, y), r, 1, -1)
        return out


def record(n, size=(90, 120), seed=0) -> DiscRecord:
    return DiscRecord(image=f"img{seed}.png", size=size, source=f"ann{seed}", categories=("object",) * n, n=n, seed=seed)


RECORDS = [record(3, seed=0), record(40, (200, 160), seed=1), record(20, (64, 64), seed=2), record(1, seed=3)]
POINTS = PromptConfig(prompt="box+point", num_points=2, point_mode="random", negative_points=1, box_jitter=0.1)


def test_item_keys_shapes_and_frames():
    ds = MaskDataset(RECORDS, 64, POINTS, max_objects=8, train=False)
    it = ds[0]
    assert it["image"].shape == (3, 48, 64) and it["image"].dtype == torch.uint8
    assert it["original_size"] == (90, 120) and it["input_size"] == (48, 64)
    assert it["masks"].shape == (3, 90, 120) and it["masks"].dtype == torch.uint8
    assert it["boxes"].shape == (3, 4) and it["boxes"].dtype == torch.float32
    assert it["points"].shape == (3, 3, 2) and it["point_labels"].shape == (3, 3)
    assert it["path"] == "img0.png" and it["index"] == 0 and it["prompt"] == "box+point" and it["first_chunk"]
    assert it["objects"].tolist() == [0, 1, 2]
    resized = ResizeLongestSide(64).apply_image(RECORDS[0].load_image())
    assert torch.equal(it["image"], torch.from_numpy(resized.transpose(2, 0, 1).copy()))
    for mask, box in zip(it["masks"].numpy(), it["boxes"].numpy()):  # validation: exact boxes
        np.testing.assert_array_equal(box, mask_to_box(mask))
    boxes_only = MaskDataset(RECORDS, 64, PromptConfig(), train=False)[0]
    assert boxes_only["points"].shape == (3, 0, 2) and boxes_only["prompt"] == "box"


def test_validation_covers_every_object_once_in_chunks_of_max_objects():
    ds = MaskDataset(RECORDS, 64, POINTS, max_objects=8, train=False)
    assert len(ds) == 1 + 5 + 3 + 1
    seen = {}
    for k in range(len(ds)):
        it = ds[k]
        assert len(it["masks"]) <= 8 and it["first_chunk"] == (it["objects"][0].item() == 0)
        seen.setdefault(it["index"], []).extend(it["objects"].tolist())
        expected = RECORDS[it["index"]].load_masks(it["objects"].tolist())
        assert np.array_equal(it["masks"].numpy(), expected)
    assert seen == {i: list(range(r.num_objects)) for i, r in enumerate(RECORDS)}
    # Sharded by image: every chunk of an image on one rank, every chunk on exactly one rank.
    shards = [ds.shard(r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(ds)))
    for r, shard in enumerate(shards):
        assert {ds.chunks[k][0] % 3 for k in shard} == {r}
    # An object's prompts do not depend on which chunk holds it.
    other = MaskDataset(RECORDS, 64, POINTS, max_objects=5, train=False)
    a = torch.cat([ds[k]["points"] for k in range(1, 6)])
    b = torch.cat([other[k]["points"] for k in range(1, 9)])
    assert torch.equal(a, b)


def test_training_takes_a_fresh_seeded_subset_each_epoch():
    ds = MaskDataset(RECORDS, 64, POINTS, max_objects=8, seed=5)
    assert len(ds) == 4
    subsets = [ds[(1, epoch)]["objects"].tolist() for epoch in range(4)]
    assert all(len(s) == 8 and s == sorted(s) and len(set(s)) == 8 for s in subsets)
    assert len({tuple(s) for s in subsets}) == 4
    assert ds[(1, 2)]["objects"].tolist() == subsets[2]  # same (seed, epoch, index): same choice
    assert MaskDataset(RECORDS, 64, POINTS, max_objects=8, seed=6)[(1, 2)]["objects"].tolist() != subsets[2]
    assert ds[(0, 3)]["objects"].tolist() == [0, 1, 2]  # fewer than max_objects: all of them
    assert ds[1]["objects"].tolist() == subsets[0]  # a plain index means epoch 0
    # Training boxes are jittered (validation's are exact), and stay inside the image.
    it = ds[(0, 0)]
    exact = np.stack([mask_to_box(m) for m in it["masks"].numpy()])
    assert not np.array_equal(it["boxes"].numpy(), exact)
    assert (it["boxes"] >= 0).all() and (it["boxes"][:, 2] <= 120).all() and (it["boxes"][:, 3] <= 90).all()


def test_augmented_items_keep_prompts_on_their_objects():
    ds = MaskDataset(RECORDS, 64, POINTS, max_objects=8, augment=("flip", "rot90", "scale"), seed=1)
    sizes = set()
    for epoch in range(6):
        it = ds[(0, epoch)]
        sizes.add(it["original_size"])
        masks = it["masks"].numpy()
        assert masks.shape[1:] == it["original_size"] and len(masks) == len(it["objects"]) >= 1
        for mask, pts, labels in zip(masks, it["points"].numpy().astype(int), it["point_labels"].numpy()):
            assert (mask[pts[labels == 1, 1], pts[labels == 1, 0]] == 1).all()
            assert (mask[pts[labels == 0, 1], pts[labels == 0, 0]] == 0).all()
    assert sizes == {(90, 120), (120, 90)}  # quarter turns happened


def epochs_through_loader(ds, workers, world_size=1, rank=0, batch_size=2):
    sampler = EpochSampler(DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=3))
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)
    out = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        out.append({it["index"]: (it["objects"].tolist(), it["points"].clone(), it["boxes"].clone())
                    for batch in loader for it in batch})
    return out


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) and torch.equal(a[k][2], b[k][2]) for k in a)


def test_persistent_workers_see_the_epoch_and_ranks_draw_what_one_process_draws():
    ds = MaskDataset(RECORDS, 64, POINTS, max_objects=8, augment=("flip", "rot90"), seed=2)
    main = epochs_through_loader(ds, workers=0)
    workers = epochs_through_loader(ds, workers=2)
    for a, b in zip(main, workers):
        assert same(a, b)
    assert not same(main[0], main[1])  # the epoch changes the draw (it reached the workers)
    # Two ranks together draw exactly what one process draws for the same images.
    ranks = [epochs_through_loader(ds, workers=0, world_size=2, rank=r, batch_size=1) for r in range(2)]
    for epoch in range(3):
        merged = {**ranks[0][epoch], **ranks[1][epoch]}
        assert same(merged, main[epoch])


def test_mixed_prompts_give_training_boxes_and_points_and_validation_boxes():
    from segment_anything.training.config import TrainConfig
    from segment_anything.utils.data.dataset import make_datasets

    cfg = TrainConfig(prompt="mixed", num_points=3, negative_points=1, image_size=64)
    train, val = make_datasets(cfg.resolve().datasets, RECORDS[:1], RECORDS[:1])
    t, v = train[(0, 0)], val[0]
    assert t["prompt"] == "box+point" and t["boxes"].shape == (3, 4)
    assert (t["point_labels"] == 1).sum(1).tolist() == [3, 3, 3] and (t["point_labels"] == 0).sum(1).tolist() == [1, 1, 1]
    assert v["prompt"] == "box" and v["points"].shape == (3, 0, 2)
    with pytest.raises(ValueError, match="--prompt mixed needs --num_points >= 1"):
        TrainConfig(prompt="mixed", num_points=0).validate()
