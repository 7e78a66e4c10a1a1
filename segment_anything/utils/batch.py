"""Dataset items -> one Batch: the images to encode (or their cached embeddings), the prompts
mapped into the encoder's resized frame, the masks at each image's original size.

A batch is a list of dataset items (see utils.data.dataset): images resized so the longest side
is the encoder size, each with N >= 1 ground-truth masks at the original size and one prompt per
mask (a box, points with labels, or both). Items that share a cache key (chunks of one image)
share one image row, so the encoder sees each image once.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..modeling import Sam
from .distill import OffTarget, off_target_batch
from .transforms import ResizeLongestSide


@dataclass
class Batch:
    images: Optional[torch.Tensor]  # (M, 3, S, S): the images to encode, one per item without a cached
    #   embedding; with a cache, one per distinct cache key (chunks of one image share it); None if M = 0
    boxes: Optional[torch.Tensor]  # (P, 4) resized frame; None when prompts are points only
    image_index: torch.Tensor  # (P,)
    masks: List[torch.Tensor]  # per image (N_i, H_i, W_i) in {0, 1}
    input_sizes: List[Tuple[int, int]]
    original_sizes: List[Tuple[int, int]]
    points: Optional[torch.Tensor] = None  # (P, K, 2) resized frame; None when no item has points
    point_labels: Optional[torch.Tensor] = None  # (P, K): 1 positive, 0 negative, -1 padding
    new_images: Optional[int] = None  # items that start an image (an image split into chunks counts once)
    cached: List[Optional[torch.Tensor]] = field(default_factory=list)  # per item: (C, g, g) or None
    cache_keys: List[Optional[str]] = field(default_factory=list)  # per item, from a cache-aware dataset
    encode_rows: List[int] = field(default_factory=list)  # per item: its row of `images`, or -1 (cached)
    num_cached: int = 0  # images (not chunks) whose embedding came from the cache
    ignore: List[Optional[torch.Tensor]] = field(default_factory=list)  # per image: (H_i, W_i) pixels out of the loss, or None
    off_target: Optional[OffTarget] = None  # the items' off-target prompts (--distill), else None

    @property
    def num_images(self) -> int:
        return len(self.masks) if self.new_images is None else self.new_images

    def prompts(self) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(boxes, image_index, points, point_labels): SamTrainStep's prompt arguments."""
        return self.boxes, self.image_index, self.points, self.point_labels


def _prompt_kind(items: List[dict]) -> str:
    kinds = {it.get("prompt", "box") for it in items}
    if len(kinds) != 1:
        raise ValueError(f"one batch mixes prompt kinds {sorted(kinds)}")
    return kinds.pop()


def _batch_points(items: List[dict], transform: ResizeLongestSide) -> Tuple[torch.Tensor, torch.Tensor]:
    """Points of all items mapped into the resized frame, padded to a common K with label -1
    (the prompt encoder's "not a point"); (P, K, 2) and (P, K)."""
    k = max(it["points"].shape[1] for it in items)
    coords, labels = [], []
    for it in items:
        n, ki = it["point_labels"].shape
        pad = k - ki
        c = transform.apply_coords_torch(it["points"], it["original_size"])
        coords.append(torch.cat([c, c.new_zeros(n, pad, 2)], dim=1))
        labels.append(torch.cat([it["point_labels"].float(), torch.full((n, pad), -1.0)], dim=1))
    return torch.cat(coords), torch.cat(labels)


def images_to_encode(items: List[dict]) -> Tuple[List[torch.Tensor], List[int]]:
    """(the uint8 images the encoder must see, per item its row among them or -1 when the item
    carries a cached embedding). Items sharing a cache key (chunks of one image) share a row."""
    to_encode, rows, row_of = [], [], {}
    for it in items:
        key = it.get("cache_key")
        if it.get("embedding") is not None:
            rows.append(-1)
        elif key is not None and key in row_of:
            rows.append(row_of[key])
        else:
            row_of[key] = len(to_encode)
            rows.append(len(to_encode))
            to_encode.append(it["image"])
    return to_encode, rows


def prepare_batch(items: List[dict], sam: Sam, device: torch.device) -> Batch:
    """Dataset items -> tensors on device, boxes and points mapped into the resized frame."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    cached = [it.get("embedding") for it in items]
    keys = [it.get("cache_key") for it in items]
    to_encode, rows = images_to_encode(items)
    images = None
    if to_encode:
        images = torch.stack([sam.preprocess(im.to(device, non_blocking=True).float()) for im in to_encode])
    kind = _prompt_kind(items)
    boxes = None
    if kind != "point":
        boxes = torch.cat([transform.apply_boxes_torch(it["boxes"], it["original_size"]) for it in items]).to(device)
    points = labels = None
    if kind != "box" and any(it.get("points") is not None and it["points"].shape[1] for it in items):
        points, labels = (t.to(device) for t in _batch_points(items, transform))
    if boxes is None and points is None:
        raise ValueError("point prompts requested but the items carry no points")
    counts = [len(it["masks"]) for it in items]
    image_index = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts))
    return Batch(
        images=images,
        boxes=boxes,
        image_index=image_index.to(device),
        masks=[it["masks"].to(device, non_blocking=True) for it in items],
        input_sizes=[tuple(it["input_size"]) for it in items],
        original_sizes=[tuple(it["original_size"]) for it in items],
        points=points,
        point_labels=labels,
        new_images=sum(1 for it in items if it.get("first_chunk", True)),
        cached=[None if emb is None else emb.to(device, non_blocking=True) for emb in cached],
        cache_keys=keys,
        encode_rows=rows,
        num_cached=sum(1 for it, emb in zip(items, cached) if emb is not None and it.get("first_chunk", True)),
        ignore=[None if it.get("ignore") is None else it["ignore"].to(device, non_blocking=True) for it in items],
        off_target=off_target_batch(items, transform, device),
    )
