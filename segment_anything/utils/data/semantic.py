"""Semantic mode's data side: class names, per-pixel class targets, the Dataset.

Classes: index 0 is always "background".
  - instance_map: a pixel's label value IS its class id (0 background); K = --num_classes, or
    the largest value in the data + 1; class names "background", "1", "2", ... .
  - every other format (folder, objects, labelme, coco): "background" + the records' category
    names sorted alphabetically (sorted, not file order: the same list whatever order files or
    COCO categories come in, and for train and validation alike). folder/objects have the one
    category "object", so K = 2.
A target paints every object of a record with its category's class id, in the record's object
order (a later object wins where two overlap); instance_map reads the label image itself.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .checks import DataError
from .formats.instance_map import InstanceMapRecord, read_instances
from .records import Record
from ..transforms import ResizeLongestSide

BACKGROUND = "background"


def class_names(records: Sequence[Record], num_classes: Optional[int] = None) -> List[str]:
    """The run's class list (index = class id) from all records (train + validation).
    DataError naming the file when a label value does not fit --num_classes, or when
    --num_classes disagrees with the categories found."""
    if records and all(isinstance(r, InstanceMapRecord) for r in records):
        top = max((max(r.objects, default=0) for r in records), default=0)
        if num_classes is not None:
            bad = next((r for r in records if max(r.objects, default=0) >= num_classes), None)
            if bad is not None:
                raise DataError(f"{bad.mask}: label value {max(bad.objects)} >= --num_classes {num_classes} "
                                f"(with --task semantic a label value is a class id, 0 = background)")
        k = num_classes or top + 1
        return [BACKGROUND] + [str(v) for v in range(1, max(k, 2))]
    if any(isinstance(r, InstanceMapRecord) for r in records):
        raise DataError("--task semantic: training and validation data mix instance_map and other formats")
    names = [BACKGROUND] + sorted({c for r in records for c in r.categories} - {BACKGROUND})
    if num_classes is not None and num_classes != len(names):
        raise DataError(f"--num_classes {num_classes}, but the data has {len(names)} classes "
                        f"({', '.join(names)}: background + its categories)")
    return names


def semantic_target(record: Record, class_ids: Dict[str, int]) -> np.ndarray:
    """int64 (H, W) class id per pixel. class_ids: category name -> id (unused for instance_map,
    whose label values are the ids; values of objects the record dropped, e.g. by --min_area or
    --foreground_values, become background)."""
    if isinstance(record, InstanceMapRecord):
        labels = read_instances(record.mask, record.image_spec.plane).astype(np.int64)
        return np.where(np.isin(labels, record.objects), labels, 0)
    target = np.zeros(record.size, np.int64)
    for mask, category in zip(record.load_masks(), record.categories):
        target[mask.astype(bool)] = class_ids[category]
    return target


class SemanticDataset(Dataset):
    """One item per image:

      image          uint8 (3, h, w) resized so the longest side is image_size (absent on a cache hit)
      embedding      (C, g, g) in the cache dtype, on a cache hit; cache_key with a cache
      target         int64 (H, W) class ids at the original size
      original_size  (H, W); input_size (h, w); path; index
    The embedding cache (set as ``cache`` before the first iteration) is the prompt mode's:
    same keys, so both modes share entries for the same encoder.
    """

    def __init__(self, records: Sequence[Record], image_size: int, classes: Sequence[str], cache=None) -> None:
        self.records, self.cache = list(records), cache
        self.class_ids = {name: i for i, name in enumerate(classes)}
        self.transform = ResizeLongestSide(image_size)

    def __len__(self) -> int:
        return len(self.records)

    def shard(self, rank: int, world_size: int) -> List[int]:
        """Validation images of one rank: rank, rank + world_size, ... (each scored once)."""
        return list(range(rank, len(self), world_size))

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key  # (index, epoch) from EpochSampler
        record = self.records[index]
        item = {}
        if self.cache is not None:
            item["cache_key"] = self.cache.key_for(record.image, **record.cache_parts())
            item["embedding"] = self.cache.lookup(item["cache_key"])
        if item.get("embedding") is None:
            # The predictor's own resize, so training inputs are exactly what inference sees.
            image = self.transform.apply_image(record.load_image())
            item["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        h, w = record.size
        item.update(target=torch.from_numpy(semantic_target(record, self.class_ids)), original_size=(h, w),
                    input_size=ResizeLongestSide.get_preprocess_shape(h, w, self.transform.target_length),
                    path=record.name, index=int(index), first_chunk=True)
        return item
