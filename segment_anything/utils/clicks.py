"""Simulated corrective clicks: where a user would click next to fix a predicted mask, one object
at a time (click_session, as the evaluate tool scores) or for every prompt of a batch at once
(next_clicks, as interactive training and validation use).

The next click goes into the larger of the two error regions (missed object pixels -> a positive
click, wrongly included pixels -> a negative click), at the pixel of that region farthest from
its border: the point a person would pick, and one that stays inside thin or ring-shaped errors.
Coordinates are (x, y) pixels of the mask's frame.
"""

from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import torch

from .transforms import ResizeLongestSide


def _depth(region: np.ndarray) -> np.ndarray:
    """float32 (H, W): distance of each region pixel to the nearest non-region pixel, the outside
    of the image counting as non-region (so a click never lands on the image edge when it can
    avoid it)."""
    padded = cv2.copyMakeBorder(region.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def corrective_click(pred: np.ndarray, target: np.ndarray) -> Optional[Tuple[np.ndarray, int]]:
    """The next click for a prediction against the ground truth, both (H, W) bool.

    Returns (xy float32 (2,), label) with label 1 where the prediction misses object pixels
    (false negatives outnumber false positives) and 0 otherwise, or None when pred == target.
    Ties between the two regions go to the positive click. Deterministic (first maximum in
    row-major order)."""
    pred, target = pred.astype(bool), target.astype(bool)
    missed, extra = target & ~pred, pred & ~target
    if not missed.any() and not extra.any():
        return None
    positive = missed.sum() >= extra.sum()
    depth = _depth(missed if positive else extra)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([x, y], np.float32), int(positive)


def random_click(pred: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> Optional[Tuple[np.ndarray, int]]:
    """As clicks.corrective_click (same region and label), but at a pixel drawn uniformly from
    the region rather than its deepest pixel."""
    pred, target = pred.astype(bool), target.astype(bool)
    missed, extra = target & ~pred, pred & ~target
    if not missed.any() and not extra.any():
        return None
    positive = missed.sum() >= extra.sum()
    ys, xs = np.nonzero(missed if positive else extra)
    j = int(rng.integers(ys.size))
    return np.array([xs[j], ys[j]], np.float32), int(positive)


def next_clicks(preds: List[torch.Tensor], targets: List[torch.Tensor], mode: str,
                rngs: Optional[List[np.random.Generator]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One click per prompt from its prediction and target (both per image (n, H, W), same
    frame). Returns xy (P, 2) float32 in that frame's pixels and labels (P,) (1 positive,
    0 negative, -1 no click: the prediction is already exact)."""
    xy, labels, j = [], [], 0
    for pred, target in zip(preds, targets):
        for p, t in zip(pred.cpu().numpy(), target.cpu().numpy()):
            click = corrective_click(p, t) if mode == "center" else random_click(p, t, rngs[j])
            xy.append(click[0] if click else np.zeros(2, np.float32))
            labels.append(click[1] if click else -1)
            j += 1
    return np.stack(xy).astype(np.float32), np.array(labels, np.float32)


def to_input_frame(xy: np.ndarray, batch, frame_sizes: List[Tuple[int, int]], image_size: int) -> torch.Tensor:
    """Clicks (P, 2) in each image's frame_sizes[i] pixels -> the encoder's resized frame."""
    transform = ResizeLongestSide(image_size)
    counts = [m.shape[0] for m in batch.masks]
    parts, start = [], 0
    for n, size in zip(counts, frame_sizes):
        parts.append(transform.apply_coords(xy[start:start + n].copy(), size))
        start += n
    return torch.from_numpy(np.concatenate(parts).astype(np.float32)).to(batch.image_index.device)


# predict(points (K, 2), labels (K,), mask_input (1, h, w) logits or None)
#   -> (mask (H, W) bool, low-res logits (1, h, w))
PredictFn = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], Tuple[np.ndarray, np.ndarray]]


def click_session(predict: PredictFn, target: np.ndarray, points: np.ndarray, labels: np.ndarray,
                  first_mask: np.ndarray, first_logits: np.ndarray, n_clicks: int) -> List[np.ndarray]:
    """Masks after 1..n_clicks corrective clicks, starting from a first prediction.

    Each round adds corrective_click(previous mask, target) to the prompt's points and passes
    the previous round's low-res logits as the mask prompt, as in SAM's interactive training
    and evaluation. points (K, 2) / labels (K,) are the initial prompt's points (K may be 0; a
    box, if any, is the caller's business inside ``predict``). Stops early, repeating the last
    mask, once the mask equals the target. Returns n_clicks masks (H, W) bool."""
    masks, mask, logits = [], first_mask, first_logits
    points, labels = np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels, np.float32).reshape(-1)
    for _ in range(n_clicks):
        click = corrective_click(mask, target)
        if click is not None:
            points = np.concatenate([points, click[0][None]])
            labels = np.concatenate([labels, [float(click[1])]]).astype(np.float32)
            mask, logits = predict(points, labels, logits)
        masks.append(mask)
    return masks
