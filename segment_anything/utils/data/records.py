"""The one record type every data format turns into.

A Record is one image and the objects annotated on it. It is small and picklable (it crosses
process boundaries: spawned workers, DataLoader workers); pixels are read only when asked for.
Each format subclasses Record and implements the two loaders; everything downstream (prompts,
augmentation, the Dataset, the embedding cache, evaluation, the prepare tool) uses only this
interface.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Record:
    image: str  # path of the image file (for labelme with an embedded image: the JSON file)
    size: Tuple[int, int]  # (H, W) of the decoded image, EXIF orientation applied
    source: str  # the annotation file or folder the objects come from (named in messages)
    categories: Tuple[str, ...]  # one entry per object; "object" where the format has no classes

    @property
    def num_objects(self) -> int:
        return len(self.categories)

    def load_image(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        raise NotImplementedError

    def load_masks(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """uint8 (N, H, W) in {0, 1}: the objects at `indices` (default: all), in that order."""
        raise NotImplementedError
