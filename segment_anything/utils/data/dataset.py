"""MaskDataset: one item per Record, every object its own target with its own box prompt.

A minimal records-based dataset (boxes only, every object every step); the full one (points,
--max_objects, augmentation) replaces it. Item keys are those of the Record interface notes in
COORDINATION.md.
"""

from typing import List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..transforms import ResizeLongestSide
from .checks import DataError
from .records import Record, mask_to_box


class MaskDataset(Dataset):
    """Items:
      image          uint8 (3, h, w): RGB resized so the longest side is image_size (not padded)
      original_size  (H, W) of the file
      input_size     (h, w) after resizing
      masks          uint8 (N, H, W) in {0, 1} at original size, one per object
      boxes          float32 (N, 4) xyxy in original pixels, from `mask_to_box`
      points         float32 (N, 0, 2); point_labels float32 (N, 0): no point prompts here
      path           the image path; index: the dataset index
    With an embedding cache (data.cache.EmbeddingCache), items also carry `cache_key`, and a hit
    carries `embedding` (C, g, g) in the cache dtype instead of `image` (the image is not decoded).
    """

    def __init__(self, records: Sequence[Record], image_size: int, cache=None):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records, self.image_size = list(records), image_size
        self.transform = ResizeLongestSide(image_size)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        masks = record.load_masks()
        key = self.cache.key_for(record.image) if self.cache is not None else None
        embedding = self.cache.lookup(key) if key is not None else None
        pixels = {"embedding": embedding, "cache_key": key} if key is not None else {}
        if embedding is None:
            # The predictor's own resize, so fine-tuning inputs are exactly what inference sees.
            pixels["image"] = torch.from_numpy(np.ascontiguousarray(
                self.transform.apply_image(record.load_image()).transpose(2, 0, 1)))
        h, w = ResizeLongestSide.get_preprocess_shape(masks.shape[1], masks.shape[2], self.image_size)
        try:
            boxes = np.stack([mask_to_box(m) for m in masks])
        except (DataError, ValueError) as err:
            raise DataError(f"{record.source}: {err}") from err
        n = len(masks)
        return {
            **pixels,
            "original_size": (int(masks.shape[1]), int(masks.shape[2])),
            "input_size": (h, w),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
            "boxes": torch.from_numpy(boxes),
            "points": torch.zeros((n, 0, 2), dtype=torch.float32),
            "point_labels": torch.zeros((n, 0), dtype=torch.float32),
            "path": record.image,
            "index": i,
        }


def collate(batch: List[dict]) -> List[dict]:
    """Keep items as a list: sizes differ, and the trainer pads and stacks on its side."""
    return list(batch)
