"""Training augmentation with albumentations: one random draw moves the image and every object mask.

Prompts are drawn afterwards from the augmented masks, so a box or a point always matches the
target the loss sees. The randomness comes from a seed the caller derives from its own numpy
Generator (seeded by seed, epoch and image index), never from a per-process stream.
"""

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

AUGMENTATIONS = ("flip", "rot90", "scale", "color")
SCALE_RANGE = (0.8, 1.25)  # zoom about the image centre, same size out: zooming in crops, out pads with 0


def parse_augment(value: str) -> Tuple[str, ...]:
    """'flip,rot90' -> ('flip', 'rot90'); '' or 'none' -> (); unknown names raise ValueError."""
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTATIONS)}")
    return names


def _transforms(names: Sequence[str]) -> list:
    import albumentations as A  # a listed requirement; imported here so prompts and datasets load without it

    out = []
    if "flip" in names:
        out += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if "rot90" in names:
        out.append(A.RandomRotate90(p=1.0))  # k in 0..3 quarter turns
    if "scale" in names:
        out.append(A.Affine(scale=SCALE_RANGE, keep_ratio=True, interpolation=cv2.INTER_LINEAR,
                            mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                            fill=0, fill_mask=0, p=1.0))
    if "color" in names:
        out.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.8))
    return out


class Augment:
    """Callable (image, masks, rng) -> (image, masks, kept).

    image uint8 (H, W, 3), masks uint8 (N, H, W) in {0, 1}; outputs have the augmented size
    (a quarter turn swaps H and W). kept: int64 indices into the N input masks of the objects
    still visible (zooming in can push an object out of the frame); if none would be left, the
    draw is repeated without the zoom, so an item always keeps at least one object.
    """

    def __init__(self, names: Sequence[str]) -> None:
        import albumentations as A

        self.names = tuple(names)
        self.full = A.Compose(_transforms(self.names))
        self.no_zoom = A.Compose(_transforms([n for n in self.names if n != "scale"]))

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, image: np.ndarray, masks: np.ndarray,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        seeds = [int(s) for s in rng.integers(2**31, size=len(self.full.transforms) + 1)]
        for compose in (self.full, self.no_zoom):
            # Compose.set_random_seed gives every transform the same seed, so their draws would
            # be equal (both flips, or neither): each transform gets its own seed instead.
            compose.set_random_seed(seeds[-1])
            for transform, seed in zip(compose.transforms, seeds):
                transform.set_random_seed(seed)
            out = compose(image=image, masks=masks)
            new_masks = np.asarray(out["masks"], dtype=np.uint8).reshape(-1, *out["image"].shape[:2])
            kept = np.flatnonzero(new_masks.reshape(len(new_masks), -1).any(axis=1))
            if kept.size or not len(masks):
                return out["image"], new_masks[kept], kept
        raise AssertionError("unreachable: without the zoom every object stays in the frame")


def build_augment(names: Optional[Sequence[str]]) -> Optional[Augment]:
    return Augment(names) if names else None
