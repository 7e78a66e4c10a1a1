"""`instance_map`: the `folder` layout, but each mask is an integer label image (8- or 16-bit PNG
or TIFF): 0 is background, every other value one object (the cellpose / micro-sam convention).

Never auto-detected: a label map and a broken binary mask look alike. --foreground_values keeps
only the listed label values.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..checks import BadSample
from ..image_io import ImageSpec, load_image, read_label
from ..records import Record, pick, stack_masks
from . import DataOptions, Scan, finish, size_mismatch
from .folder import Pair, check_lossless, find_pairs, pair_files


def read_instances(path, plane: Optional[int] = None) -> np.ndarray:
    labels = read_label(path, plane)
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadSample("not a label map", f"{path}: label map must hold integers, found {labels.dtype}")
    return labels


@dataclass(frozen=True)
class InstanceMapRecord(Record):
    mask: str = ""
    objects: Tuple[int, ...] = ()  # label values
    image_spec: ImageSpec = ImageSpec()

    def load_image(self) -> np.ndarray:
        return load_image(self.image, self.image_spec)

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = pick(indices, len(self.objects))
        labels = read_instances(self.mask, self.image_spec.plane)
        return stack_masks([labels == self.objects[i] for i in chosen], self.size)

    def label_map(self):
        return read_instances(self.mask, self.image_spec.plane), self.objects


def build(pair: Pair, opts: DataOptions):
    check_lossless(pair.mask)
    image = load_image(pair.image, opts.image_spec)
    labels = read_instances(pair.mask, opts.image_spec.plane)
    if image.shape[:2] != labels.shape:
        raise size_mismatch(str(pair.image), image, str(pair.mask), labels.shape)
    # Areas from one count over the map: N full-size masks of a large map would not fit in memory.
    found, counts = np.unique(labels, return_counts=True)
    area = {int(v): int(n) for v, n in zip(found, counts) if v != 0}
    values = list(area)
    if opts.foreground_values:
        values = [v for v in values if v in opts.foreground_values]
    record = InstanceMapRecord(str(pair.image), image.shape[:2], str(pair.mask), ("object",) * len(values),
                               str(pair.mask), tuple(values), opts.image_spec)
    areas = np.array([area[v] for v in values], np.int64)
    return finish(record, image, None, opts, areas=areas)


def scan(root, opts: DataOptions) -> Scan:
    pairs, problems = find_pairs(Path(root))
    return Scan("instance_map", str(root), pairs, lambda p: build(p, opts), problems, pair_files, build)
