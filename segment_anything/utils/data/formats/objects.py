"""`objects`: DIR/<id>/images/<id>.<ext> + DIR/<id>/masks/*.png, one binary mask file per object
(the Kaggle Data Science Bowl 2018 nucleus layout). Folder aliases as for `folder`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..checks import BadSample, DataError, Problem
from ..image_io import ImageSpec, is_image_file, load_image, load_mask
from ..records import Record, pick, stack_masks
from . import IMAGE_DIRS, MASK_DIRS, DataOptions, Scan, find_dir, finish, size_mismatch


@dataclass(frozen=True)
class Sample:
    folder: Path
    image: Path
    masks: Tuple[Path, ...]


@dataclass(frozen=True)
class ObjectsRecord(Record):
    objects: Tuple[str, ...] = ()  # one mask file per object
    threshold: int = 127
    image_spec: ImageSpec = ImageSpec()
    foreground_values: Tuple[int, ...] = ()  # --foreground_values: the mask values that are the object

    def load_image(self) -> np.ndarray:
        return load_image(self.image, self.image_spec)

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        chosen = pick(indices, len(self.objects))
        return stack_masks([load_mask(self.objects[i], self.threshold, self.foreground_values, self.image_spec.plane)
                            for i in chosen], self.size)


def _files(folder: Optional[Path]):
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder else []


def find_samples(root: Path):
    """(samples, problems): one sample per subfolder with exactly one image."""
    samples, problems = [], []
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not folders:
        raise DataError(f"{root}: no sample folders; expected {root}/<id>/images/<id>.png + {root}/<id>/masks/*.png")
    for folder in folders:
        images, masks = _files(find_dir(folder, IMAGE_DIRS)), _files(find_dir(folder, MASK_DIRS))
        if len(images) != 1:
            what = "no image" if not images else f"{len(images)} images ({', '.join(p.name for p in images[:3])})"
            kind = "mask without image" if masks and not images else "bad sample folder"
            problems.append(Problem(kind, f"{folder}: {what} in images/; expected exactly one"))
            continue
        samples.append(Sample(folder, images[0], tuple(masks)))
    return samples, problems


def build(sample: Sample, opts: DataOptions):
    image = load_image(sample.image, opts.image_spec)
    masks = []
    for path in sample.masks:
        mask = load_mask(path, opts.mask_threshold, opts.foreground_values, opts.image_spec.plane)
        if mask.shape != image.shape[:2]:
            raise size_mismatch(str(sample.image), image, str(path), mask.shape)
        masks.append(mask)
    if not masks:
        raise BadSample("no objects", f"{sample.folder}: no mask files in masks/")
    record = ObjectsRecord(str(sample.image), image.shape[:2], str(sample.folder), ("object",) * len(masks),
                           tuple(str(p) for p in sample.masks), opts.mask_threshold, opts.image_spec, opts.foreground_values)
    return finish(record, image, stack_masks(masks, image.shape[:2]), opts)


def scan(root, opts: DataOptions) -> Scan:
    samples, problems = find_samples(Path(root))
    return Scan("objects", str(root), samples, lambda s: build(s, opts), problems,
                lambda s: (str(s.image), tuple(str(m) for m in s.masks)), build)
