"""The Dataset over Records: one prompt per object, seeded randomness, validation in chunks.

Training: one item per image. At most `max_objects` of its objects, a fresh choice each epoch,
then augmentation, then prompts drawn from the augmented masks. With --objects_per_step the
ObjectBatchSampler asks for given objects instead (key (index, epoch, first, end)): a piece of the
image's objects, every object once per epoch; pieces of one image share its augmentation. Every random choice comes from
a numpy Generator seeded by (seed, epoch, image index) (and the object's own index for its
prompts), so any process, any DataLoader worker and any batch split draw the same data. The
epoch reaches the workers with each index (`EpochSampler` yields (index, epoch)): an attribute
set on the dataset in the main process would not reach persistent workers.

Validation: every object of every image, in items of at most `max_objects` objects (chunks of
one image are consecutive and share `index`; the trainer encodes the image once), so memory
stays bounded however many objects an image holds. No augmentation, no box jitter.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..transforms import ResizeLongestSide
from .augment import build_augment
from .checks import DataError
from .prompts import PromptConfig, object_prompts, off_target_prompts
from .records import Record

# A dataset index, (index, epoch) from EpochSampler, or (index, epoch, first, end) from ObjectBatchSampler.
Index = Union[int, Tuple[int, int], Tuple[int, int, int, int]]
OFF_TARGET_STREAM = (0, 1)  # item_rng's extra numbers for the off-target prompts: apart from every object's stream


def item_rng(seed: int, epoch: int, index: int, *more: int) -> np.random.Generator:
    """The Generator for one image in one epoch (more: e.g. an object index). The same numbers
    give the same stream on any process."""
    return np.random.default_rng([seed, epoch, index, *more])


class MaskDataset(Dataset):
    """Items (dicts) for the trainer; keys as in COORDINATION.md:

      image          uint8 (3, h, w): RGB resized so the longest side is image_size (not padded)
      original_size  (H, W) of the (augmented) image; masks, boxes and points are in this frame
      input_size     (h, w) after resizing
      masks          uint8 (N, H, W) in {0, 1}, N <= max_objects
      boxes          float32 (N, 4) xyxy pixels (cv2.boundingRect convention; jittered in training)
      points         float32 (N, K, 2) xy pixels, K = prompts.points_per_object (0 for box prompts)
      point_labels   float32 (N, K): 1 positive, 0 negative, -1 padding
      path           the image file
      index          int, the image's index in `records`
      prompt         'box', 'point' or 'box+point': which prompts the step gives the decoder
      objects        int64 (N,): the objects' indices in the record
      first_chunk    bool: the item holds the image's first objects (images are counted by it)
      ignore         uint8 (H, W), only for a tile with fragments (data.tiling): pixels left out of the loss
    With off_target = n > 0 (--distill), also off_boxes float32 (ceil(n/2), 4) and off_points
    float32 (n//2, 2): prompts that ignore the objects (prompts.off_target_prompts), drawn from
    their own Generator (seed, epoch, image, *OFF_TARGET_STREAM); every chunk of an image has them.
    With an embedding cache (data.cache.EmbeddingCache, set as `cache` before the first
    iteration), items also carry `cache_key`, and a hit carries `embedding` (C, g, g) in the cache
    dtype instead of `image` (the image file is then not decoded). open_cache refuses to run with
    augmentation, so a hit's frame is always the file's own.
    """

    def __init__(self, records: Sequence[Record], image_size: int, prompts: PromptConfig = PromptConfig(),
                 max_objects: int = 16, augment: Sequence[str] = (), seed: int = 0, train: bool = True,
                 cache=None, off_target: int = 0) -> None:
        if image_size <= 0 or max_objects < 1:
            raise ValueError(f"image_size and max_objects must be positive, got {image_size}, {max_objects}")
        self.records, self.prompts, self.max_objects = list(records), prompts, max_objects
        self.seed, self.train, self.cache, self.off_target = seed, train, cache, off_target
        self.transform = ResizeLongestSide(image_size)
        self.augment = build_augment(augment) if train else None
        # Validation items: (image index, first object) per chunk of max_objects objects.
        self.chunks: List[Tuple[int, int]] = [
            (i, start) for i, r in enumerate(self.records) for start in range(0, r.num_objects, max_objects)
        ]

    def __len__(self) -> int:
        return len(self.records) if self.train else len(self.chunks)

    def object_counts(self) -> List[int]:
        """Objects per image, in record order (what ObjectBatchSampler packs)."""
        return [r.num_objects for r in self.records]

    def image_sizes(self) -> List[Tuple[int, int]]:
        """(H, W) per image, in record order (what the sampler's cost model weighs objects by)."""
        return [tuple(r.size) for r in self.records]

    def shard(self, rank: int, world_size: int) -> List[int]:
        """Item positions of this rank for validation: whole images (all their chunks), images
        rank, rank + world_size, ..., so each image is encoded and counted on one rank only."""
        if self.train:
            return list(range(rank, len(self), world_size))
        return [k for k, (i, _) in enumerate(self.chunks) if i % world_size == rank]

    def __getitem__(self, key: Index) -> dict:
        index, epoch, *piece = key if isinstance(key, tuple) else (key, 0)
        if self.train:
            record = self.records[index]
            rng = item_rng(self.seed, epoch, index)
            n = record.num_objects
            if piece:  # the objects the sampler chose, however many
                return self._item(index, epoch, np.arange(*piece), rng, first=piece[0] == 0)
            objects = np.arange(n) if n <= self.max_objects else np.sort(rng.choice(n, self.max_objects, replace=False))
            return self._item(index, epoch, objects, rng, first=True)
        image_index, start = self.chunks[index]
        stop = min(start + self.max_objects, self.records[image_index].num_objects)
        return self._item(image_index, 0, np.arange(start, stop), None, first=start == 0)

    def _item(self, index: int, epoch: int, objects: np.ndarray, rng: Optional[np.random.Generator],
              first: bool) -> dict:
        record = self.records[index]
        masks = record.load_masks(objects.tolist())
        key = self.cache.key_for(record.image, **record.cache_parts()) if self.cache is not None else None
        embedding = self.cache.lookup(key) if key is not None else None
        pixels = {"embedding": embedding, "cache_key": key} if key is not None else {}
        if embedding is None:
            image = record.load_image()
            if self.augment is not None:
                image, masks, kept = self.augment(image, masks, rng)
                objects = objects[kept]
            # The predictor's own resize, so fine-tuning inputs are exactly what inference sees.
            pixels["image"] = torch.from_numpy(np.ascontiguousarray(self.transform.apply_image(image).transpose(2, 0, 1)))
        size = (int(masks.shape[1]), int(masks.shape[2]))
        boxes, points, labels = self._prompts(record, index, masks, objects, epoch)
        ignore = record.ignore_mask()  # never with augmentation (the configuration refuses --augment with --tile)
        if ignore is not None:
            pixels["ignore"] = torch.from_numpy(ignore)
        if self.off_target:
            off_boxes, off_points = off_target_prompts(size, self.off_target, item_rng(self.seed, epoch, index, *OFF_TARGET_STREAM))
            pixels.update(off_boxes=torch.from_numpy(off_boxes), off_points=torch.from_numpy(off_points))
        return {
            **pixels,
            "original_size": size,
            "input_size": ResizeLongestSide.get_preprocess_shape(size[0], size[1], self.transform.target_length),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
            "boxes": torch.from_numpy(boxes),
            "points": torch.from_numpy(points),
            "point_labels": torch.from_numpy(labels),
            "path": record.name,
            "index": int(index),
            "prompt": self.prompts.prompt,
            "objects": torch.from_numpy(objects.astype(np.int64)),
            "first_chunk": bool(first),
        }

    def _prompts(self, record: Record, index: int, masks: np.ndarray, objects: np.ndarray,
                 epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per object, from its own Generator (seed, epoch, image, object): an object's prompts do
        not depend on which other objects share its item or chunk."""
        k = self.prompts.points_per_object
        boxes = np.zeros((len(objects), 4), np.float32)
        points = np.zeros((len(objects), k, 2), np.float32)
        labels = np.zeros((len(objects), k), np.float32)
        for j, (mask, obj) in enumerate(zip(masks, objects)):
            rng = item_rng(self.seed, epoch, index, int(obj) + 1)  # + 1: [s, e, i, 0] is the same stream as [s, e, i]
            try:
                boxes[j], points[j], labels[j] = object_prompts(mask, self.prompts, rng, jitter=self.train)
            except ValueError as err:
                raise DataError(f"{record.source}: object {int(obj)} of {record.describe()}: {err}") from err
        return boxes, points, labels


def collate(batch: List[dict]) -> List[dict]:
    """Keep items as a list: sizes differ, and the trainer pads and stacks on its side."""
    return list(batch)


@dataclass(frozen=True)
class DatasetSpec:
    """The datasets of a run (training.config's resolve builds it): augmentation and box jitter
    only in training; validation prompts may differ (--prompt mixed: boxes)."""

    image_size: int
    prompts: PromptConfig = PromptConfig()
    val_prompts: PromptConfig = PromptConfig()
    max_objects: int = 16
    augment: Tuple[str, ...] = ()
    seed: int = 0
    off_target: int = 0  # off-target prompts per image in both sets (--distill; see MaskDataset)


def make_datasets(spec: DatasetSpec, train: Sequence[Record], val: Sequence[Record],
                  cache=None) -> Tuple[MaskDataset, MaskDataset]:
    """(training, validation) datasets."""
    return (MaskDataset(train, spec.image_size, spec.prompts, spec.max_objects, spec.augment, spec.seed, train=True,
                        cache=cache, off_target=spec.off_target),
            MaskDataset(val, spec.image_size, spec.val_prompts, spec.max_objects, seed=spec.seed, train=False,
                        cache=cache, off_target=spec.off_target))
