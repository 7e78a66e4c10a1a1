"""Tiled training data (utils.data.tiling) and the loss's ignore mask, against hand-computed cases.

The image is 100 x 150 (H x W), tiles of 64 with an overlap of 16: origins x 0, 48, 86 and y 0, 36,
so six tiles t0 (0,0,64,64), t1 (48,0,112,64), t2 (86,0,150,64), t3 (0,36,64,100),
t4 (48,36,112,100), t5 (86,36,150,100). Objects (x0:x1, y0:y1, exclusive ends):
  A  5:15,  5:15   area 100, only in t0
  B 50:60,  5:15   area 100, whole in t0 and t1; t0's inner sides are further from it (4 vs 2)
  C 40:70, 20:30   area 300: 240 in t0, 220 in t1
  D 30:90, 32:80   area 2880: t0 34x32=1088, t1 42x32=1344, t2 4x32=128, t3 34x44=1496,
                   t4 42x44=1848 (0.64, the most), t5 4x44=176
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import MaskDataset
from segment_anything.utils.data.cache import EmbeddingCache
from segment_anything.utils.data.prompts import PromptConfig
from segment_anything.utils.data.records import Record, pick, stack_masks
from segment_anything.utils.data.tiling import assign, measure, tile_records
from segment_anything.utils.losses import DEFAULT_LOSS_SPEC, LossSpec, bce_loss, sam_loss
from segment_anything.utils.resize import resize_logits
from segment_anything.utils.tiles import tile_grid
from segment_anything.utils.batch import Batch
from segment_anything.utils.trainer import score

H, W, TILE, OVERLAP = 100, 150, 64, 16
BOXES = {"A": (5, 5, 15, 15), "B": (50, 5, 60, 15), "C": (40, 20, 70, 30), "D": (30, 32, 90, 80)}
A, B, C, D = range(4)


@dataclass(frozen=True)
class ArrayRecord(Record):
    """A record whose objects are rectangles drawn on demand (no files)."""

    boxes: tuple = ()

    def load_image(self) -> np.ndarray:
        y, x = np.mgrid[:H, :W]
        return np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        masks = []
        for i in pick(indices, len(self.boxes)):
            m = np.zeros((H, W), np.uint8)
            x0, y0, x1, y1 = self.boxes[i]
            m[y0:y1, x0:x1] = 1
            masks.append(m)
        return stack_masks(masks, (H, W))


def record() -> ArrayRecord:
    return ArrayRecord("slide.png", (H, W), "slide.png", ("object",) * 4, tuple(BOXES.values()))


def test_grid_is_the_inference_grid_by_hand():
    assert tile_grid(H, W, TILE, OVERLAP) == [(0, 0, 64, 64), (48, 0, 112, 64), (86, 0, 150, 64),
                                              (0, 36, 64, 100), (48, 36, 112, 100), (86, 36, 150, 100)]


def test_measure_and_assign_by_hand():
    rects = tile_grid(H, W, TILE, OVERLAP)
    area, visible, boxes = measure(record(), rects)
    assert area.tolist() == [100, 100, 300, 2880]
    assert visible.tolist() == [[100, 0, 0, 0, 0, 0], [100, 100, 0, 0, 0, 0], [240, 220, 0, 0, 0, 0],
                                [1088, 1344, 128, 1496, 1848, 176]]
    assert boxes.tolist() == [list(b) for b in BOXES.values()]
    # (trained, fragments) per tile: B whole in t1 too is not a fragment there (it is not cut).
    assert assign(area, visible, boxes, rects, (H, W), 0.5) == [
        ([A, B, C], [D]), ([], [C, D]), ([], [D]), ([], [D]), ([D], []), ([], [D])]
    # 0.7: D's largest part (0.64) is too small, it trains nowhere and is a fragment everywhere.
    out = assign(area, visible, boxes, rects, (H, W), 0.7)
    assert out[0] == ([A, B, C], [D]) and out[4] == ([], [D])
    # Exactly the share counts: C with 240 / 300 = 0.8.
    assert assign(area, visible, boxes, rects, (H, W), 0.8)[0][0] == [A, B, C]
    assert assign(area, visible, boxes, rects, (H, W), 0.81)[0] == ([A, B], [C, D])


def test_tile_records_crop_pixels_targets_and_ignore_mask():
    tiles, counts = tile_records([record()], TILE, OVERLAP, 0.5)
    assert [t.rect for t in tiles] == [(0, 0, 64, 64), (48, 36, 112, 100)]  # tiles without a trained object left out
    t0, t4 = tiles
    assert t0.objects == (A, B, C) and t0.fragments == (D,) and t4.objects == (D,) and t4.fragments == ()
    assert t0.size == (64, 64) and t0.load_image().shape == (64, 64, 3)
    np.testing.assert_array_equal(t4.load_image(), record().load_image()[36:100, 48:112])
    masks = t0.load_masks()
    assert masks.shape == (3, 64, 64) and masks.sum((1, 2)).tolist() == [100, 100, 240]  # C: its visible part
    assert t0.load_masks([2])[0, 20:30, 40:64].all()
    ignore = t0.ignore_mask()
    assert ignore.sum() == 1088 and ignore[32:64, 30:64].all()
    assert t4.ignore_mask() is None and t4.load_masks().sum() == 1848
    assert counts.tiles == [2] and counts.objects == [3, 1] and (counts.whole, counts.cut) == (2, 2)
    assert counts.fragments == 6 and counts.empty_tiles == 4 and counts.untrained == 0
    assert "1 images (1 larger than a tile) -> 2 tiles" in counts.line("train")
    # An image no larger than a tile is kept as it is.
    small = ArrayRecord("s.png", (H, W), "s.png", ("object",), (BOXES["A"],))
    assert tile_records([small], 160, OVERLAP, 0.5)[0] == [small]


def test_dataset_items_carry_the_ignore_mask_and_a_key_per_tile(tmp_path):
    tiles, _ = tile_records([record()], TILE, OVERLAP, 0.5)
    (tmp_path / "slide.png").write_bytes(b"pixels")
    cache = EmbeddingCache(tmp_path / "cache", key_parts={"weights": "w", "model_type": "vit_t"})
    keys = [cache.key_for(tmp_path / "slide.png", **t.cache_parts()) for t in tiles]
    assert len(set(keys)) == 2 and cache.key_for(tmp_path / "slide.png") not in keys
    assert tiles[0].cache_parts() == {"tile": [0, 0, 64, 64]} and record().cache_parts() == {}
    ds = MaskDataset(tiles, 64, PromptConfig(), max_objects=8, train=True)
    first, second = ds[0], ds[1]
    assert first["masks"].shape == (3, 64, 64) and torch.equal(first["ignore"], torch.from_numpy(tiles[0].ignore_mask()))
    assert "ignore" not in second
    assert first["boxes"][2].tolist() == [40, 20, 64, 30]  # C's prompt: the box of its visible part


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_ignore_mask_leaves_pixels_out_of_every_term_by_hand():
    logits = torch.tensor([[[1.0, 2.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0]]])
    ignore = torch.tensor([[0, 1, 0]], dtype=torch.uint8)
    weights = {"bce": 1.0, "dice": 1.0, "iou": 1.0, "iou_head": 1.0}
    out = sam_loss(logits, target, torch.tensor([0.75]), weights, ignore=ignore)
    # Pixels 0 and 2 only: BCE softplus(-1) (target 1) and softplus(-1) (target 0, logit -1).
    torch.testing.assert_close(out["loss_bce"], torch.tensor([(softplus(-1.0) + softplus(-1.0)) / 2]))
    p0, p2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))
    torch.testing.assert_close(out["loss_dice"], torch.tensor([1 - (2 * p0 + 1) / (p0 + p2 + 1 + 1)]))
    torch.testing.assert_close(out["loss_iou"], torch.tensor([1 - (p0 + 1) / (p0 + p2 + 1 - p0 + 1)]))
    # The thresholded mask is pixels 0 and 1; without pixel 1 it equals the target: IoU 1, not 0.5.
    torch.testing.assert_close(out["loss_iou_head"], torch.tensor([(0.75 - 1.0) ** 2]))
    plain = sam_loss(logits, target, torch.tensor([0.75]), weights)
    torch.testing.assert_close(plain["loss_iou_head"], torch.tensor([(0.75 - 0.5) ** 2]))
    torch.testing.assert_close(plain["loss_bce"], torch.tensor([(softplus(-1.0) + softplus(2.0) + softplus(-1.0)) / 3]))
    # A pixel of the target itself is never left out (overlapping objects); all-zero ignore = no ignore.
    both = sam_loss(logits, target, torch.tensor([0.75]), weights, ignore=torch.tensor([[1, 1, 0]], dtype=torch.uint8))
    torch.testing.assert_close(both["loss"], out["loss"])
    zero = sam_loss(logits, target, torch.tensor([0.75]), weights, ignore=torch.zeros(1, 3, dtype=torch.uint8))
    torch.testing.assert_close(zero["loss"], plain["loss"])
    assert bce_loss(logits, target, torch.zeros_like(target)).item() == 0.0  # nothing counted: 0, not NaN


def test_the_trainer_scores_each_image_with_its_own_ignore_mask():
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=16), mask_threshold=0.0)
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(3, 1, 4, 4, generator=gen)
    masks = [torch.zeros(2, 16, 16, dtype=torch.uint8), torch.zeros(1, 16, 16, dtype=torch.uint8)]
    masks[0][0, 2:8, 2:8] = masks[0][1, 8:, 8:] = masks[1][0, 4:12, 4:12] = 1
    ignore = torch.zeros(16, 16, dtype=torch.uint8)
    ignore[:, :4] = 1
    batch = Batch(images=None, boxes=None, image_index=torch.tensor([0, 0, 1]), masks=masks,
                  input_sizes=[(16, 16)] * 2, original_sizes=[(16, 16)] * 2, ignore=[ignore, None])
    terms = score(sam, batch, low, torch.zeros(3, 1))
    full = resize_logits(low[:, 0], (16, 16), (16, 16), 16)
    want0 = DEFAULT_LOSS_SPEC(full[:2], masks[0], torch.zeros(2), 0.0, ignore)["loss"]
    want1 = DEFAULT_LOSS_SPEC(full[2:], masks[1], torch.zeros(1), 0.0)["loss"]
    torch.testing.assert_close(terms["loss"], torch.cat([want0, want1]))
    assert not torch.allclose(want0, DEFAULT_LOSS_SPEC(full[:2], masks[0], torch.zeros(2), 0.0)["loss"])


@pytest.mark.parametrize("flags, message", [
    ({"tile": 8}, "--tile must be at least 16"),
    ({"tile": 64, "tile_overlap": 64}, "--tile_overlap must be in [0, --tile)"),
    ({"tile": -1}, "--tile must be 0 (off)"),
    ({"tile": 64, "tile_min_visible": 0.0}, "--tile_min_visible must be in (0, 1]"),
    ({"tile": 64, "augment": "flip"}, "--tile with --augment is not available"),
    ({"tile": 64, "task": "semantic"}, "--tile is not available with --task semantic"),
    ({"tile": 64, "instance_mode": "per_image"}, "--tile needs --instance_mode per_object"),
])
def test_bad_tile_flags_are_one_line_each(flags, message):
    with pytest.raises(ValueError, match=None) as err:
        TrainConfig(**flags)
    assert message in str(err.value)


def test_tiles_are_off_by_default():
    cfg = TrainConfig()
    assert cfg.tile == 0 and cfg.tile_overlap == 128 and cfg.tile_min_visible == 0.5


@dataclass(frozen=True)
class LabelRecord(ArrayRecord):
    """The same objects stored as one label image (as instance_map), objects with label 2..5; label
    9 is an object the format dropped (background for every object)."""

    def label_map(self):
        labels = np.zeros((H, W), np.int32)
        labels[90:95, 140:145] = 9
        for i, mask in enumerate(ArrayRecord.load_masks(self)):
            labels[mask > 0] = i + 2
        return labels, (2, 3, 4, 5)


def test_a_label_map_is_read_once_and_gives_the_same_tiles():
    rects = tile_grid(H, W, TILE, OVERLAP)
    labelled = LabelRecord("slide.png", (H, W), "slide.png", ("object",) * 4, tuple(BOXES.values()))
    for got, want in zip(measure(labelled, rects), measure(record(), rects)):
        np.testing.assert_array_equal(got, want)
    (a, _), (b, _) = tile_records([labelled], TILE, OVERLAP, 0.5), tile_records([record()], TILE, OVERLAP, 0.5)
    assert [(t.rect, t.objects, t.fragments) for t in a] == [(t.rect, t.objects, t.fragments) for t in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.load_masks(), y.load_masks())
        assert (x.ignore_mask() is None) == (y.ignore_mask() is None)
    np.testing.assert_array_equal(a[0].ignore_mask(), b[0].ignore_mask())


def test_with_the_loss_on_the_low_resolution_grid_the_ignore_mask_goes_there_as_the_targets_do():
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=16), mask_threshold=0.0)
    low = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask[0, 4:12, 4:12] = 1
    ignore = torch.zeros(16, 16, dtype=torch.uint8)
    ignore[:, 12:] = 1  # the last column of the 4 x 4 grid
    spec = LossSpec(DEFAULT_LOSS_SPEC.weights, size="low_res")
    batch = Batch(images=None, boxes=None, image_index=torch.tensor([0]), masks=[mask], input_sizes=[(16, 16)],
                  original_sizes=[(16, 16)], ignore=[ignore])
    terms = score(sam, batch, low, torch.zeros(1, 1), spec)
    target = torch.zeros(1, 4, 4)
    target[0, 1:3, 1:3] = 1
    grid_ignore = torch.zeros(4, 4)
    grid_ignore[:, 3] = 1
    want = sam_loss(low[:, 0], target, torch.zeros(1), spec.weights, ignore=grid_ignore)["loss"]
    torch.testing.assert_close(terms["loss"], want)
