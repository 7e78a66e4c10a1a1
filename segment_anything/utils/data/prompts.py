"""Prompts drawn from object masks: boxes, positive points inside, negative points beside.

Coordinates are (x, y) in pixels of the mask's frame. A point (x, y) names the pixel in column
x, row y (the prompt encoder adds 0.5 to reach its centre). Boxes follow cv2.boundingRect:
x0, y0 is the first foreground column/row and x1, y1 one past the last (exclusive end), as the
reference project makes them. Every random choice comes from the numpy Generator passed in, so a
caller that seeds it by (seed, epoch, image, object) gets the same prompts on any process.
"""

from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

from .records import mask_to_box  # the one definition (cv2.boundingRect, exclusive end); re-exported here

PROMPTS = ("box", "point", "box+point")
POINT_MODES = ("center", "random")


@dataclass(frozen=True)
class PromptConfig:
    prompt: str = "box"  # one of PROMPTS
    num_points: int = 1  # positive points per object when points are used
    point_mode: str = "center"  # one of POINT_MODES
    negative_points: int = 0  # background points per object (from the box), when points are used
    box_jitter: float = 0.0  # each box side moves by up to this fraction of the box side

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.point_mode not in POINT_MODES:
            raise ValueError(f"point_mode must be one of {POINT_MODES}, got {self.point_mode!r}")
        if self.num_points < 0 or self.negative_points < 0:
            raise ValueError("num_points and negative_points must be >= 0")
        if not 0.0 <= self.box_jitter < 0.5:
            raise ValueError(f"box_jitter must be in [0, 0.5) so a box never turns inside out, got {self.box_jitter}")

    @property
    def uses_box(self) -> bool:
        return self.prompt in ("box", "box+point")

    @property
    def points_per_object(self) -> int:
        """K: the point slots of every object (positives, then negatives; unused slots are padding)."""
        return self.num_points + self.negative_points if self.prompt != "box" else 0


def inside_distance(mask: np.ndarray) -> np.ndarray:
    """float32 (H, W): each object pixel's distance to the nearest background pixel, where the
    outside of the image counts as background (OpenCV alone would treat it as foreground, and a
    "center" could then sit on the image edge)."""
    padded = cv2.copyMakeBorder(np.ascontiguousarray(mask != 0, dtype=np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def center_points(mask: np.ndarray, k: int) -> np.ndarray:
    """float32 (k, 2) xy. First the pixel farthest from the background (the centroid of a ring or
    a crescent lies outside it; this point never does); then, among the object's core (pixels at
    least half that depth inside), each next point is the one farthest from the points already
    taken, so several points spread over the object. Deterministic (ties: first in row-major order)."""
    dist = inside_distance(mask)
    ys, xs = np.nonzero(dist)
    if ys.size == 0:
        raise ValueError("mask has no foreground pixels; cannot place a point")
    depth = dist[ys, xs]
    first = int(np.argmax(depth))
    chosen = [(int(xs[first]), int(ys[first]))]
    core = depth >= depth[first] / 2
    xs, ys = xs[core], ys[core]
    far = np.full(xs.shape, np.inf)
    for _ in range(k - 1):
        far = np.minimum(far, np.hypot(xs - chosen[-1][0], ys - chosen[-1][1]))
        i = int(np.argmax(far))
        chosen.append((int(xs[i]), int(ys[i])))
    return np.array(chosen[:k], dtype=np.float32).reshape(k, 2)


def random_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (k, 2) xy drawn uniformly from the object's pixels (with replacement only when
    the object has fewer than k pixels)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask has no foreground pixels; cannot place a point")
    pick = rng.choice(ys.size, size=k, replace=ys.size < k)
    return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32).reshape(k, 2)


def negative_points(mask: np.ndarray, box: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (m, 2) xy, m <= k: background pixels inside the box, uniformly drawn. m < k only
    when the box has fewer background pixels than k (m = 0 for a filled rectangle)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    ys, xs = np.nonzero(mask[y0:y1, x0:x1] == 0)
    if ys.size == 0 or k == 0:
        return np.zeros((0, 2), np.float32)
    pick = rng.choice(ys.size, size=min(k, ys.size), replace=False)
    return np.stack([xs[pick] + x0, ys[pick] + y0], axis=1).astype(np.float32)


def jitter_box(box: np.ndarray, fraction: float, size: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """float32 (4,): each side of box moved by up to fraction x the box's width (x sides) or
    height (y sides), uniformly, then clipped to the image of size (H, W)."""
    if fraction == 0:
        return box.astype(np.float32)
    w, h = box[2] - box[0], box[3] - box[1]
    moved = box + rng.uniform(-fraction, fraction, 4) * np.array([w, h, w, h])
    return np.clip(moved, 0, [size[1], size[0], size[1], size[0]]).astype(np.float32)


def object_prompts(mask: np.ndarray, cfg: PromptConfig, rng: np.random.Generator,
                   jitter: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts of one object mask (H, W): box float32 (4,), points float32 (K, 2) and labels
    float32 (K,) with K = cfg.points_per_object; positives first (label 1), then negatives
    (label 0), then padding (label -1, point (0, 0)) where the box has too little background.
    The box is always returned (the Dataset item carries it); jitter only when asked (training)."""
    box = mask_to_box(mask)
    k = cfg.points_per_object
    points = np.zeros((k, 2), np.float32)
    labels = np.full((k,), -1.0, np.float32)
    if k:
        n = cfg.num_points
        if n:
            points[:n] = center_points(mask, n) if cfg.point_mode == "center" else random_points(mask, n, rng)
            labels[:n] = 1.0
        neg = negative_points(mask, box, cfg.negative_points, rng)
        points[n : n + len(neg)] = neg
        labels[n : n + len(neg)] = 0.0
    if jitter and cfg.box_jitter:
        box = jitter_box(box, cfg.box_jitter, mask.shape[:2], rng)
    return box, points, labels


def off_target_prompts(size: Tuple[int, int], n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """n prompts that ignore the image's objects, for the distillation term (--distill): the first
    ceil(n / 2) are boxes, the rest single points. A box's sides are 10-50 % of the image's,
    placed uniformly inside it; a point is a uniformly drawn pixel. size: (H, W).
    Returns boxes float32 (ceil(n / 2), 4) xyxy and points float32 (n // 2, 2) xy."""
    h, w = size
    nb, npt = (n + 1) // 2, n // 2
    wh = rng.uniform(0.1, 0.5, (nb, 2)) * np.array([w, h])
    x0y0 = rng.uniform(0.0, 1.0, (nb, 2)) * (np.array([w, h]) - wh)
    boxes = np.concatenate([x0y0, x0y0 + wh], axis=1).astype(np.float32)
    points = np.stack([rng.integers(0, w, npt), rng.integers(0, h, npt)], axis=1).astype(np.float32).reshape(npt, 2)
    return boxes, points
