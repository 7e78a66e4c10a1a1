"""Pictures: masks over an image with the prompt drawn, labelled grids, distinct colours; the one
place the tools and the training run's samples.png draw with. All images are uint8 RGB (H, W, 3);
masks are (H, W) bool; coordinates are pixels."""

from typing import List, Optional, Sequence

import cv2
import numpy as np

GREEN, RED, BLUE, WHITE = (0, 220, 0), (230, 30, 30), (30, 144, 255), (255, 255, 255)


def colours(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-looking RGB colours (n, 3) uint8: evenly spaced hues, full saturation."""
    if n == 0:  # OpenCV refuses an empty picture
        return np.zeros((0, 3), np.uint8)
    hues = (np.arange(n) * 180 / max(n, 1) + seed * 37) % 180
    hsv = np.stack([hues, np.full(n, 200), np.full(n, 255)], axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], colors: Optional[np.ndarray] = None, alpha: float = 0.45,
            outline: bool = True) -> np.ndarray:
    """The image with each mask tinted in its colour and (outline=True) outlined."""
    out = image.copy()
    colors = colours(len(masks)) if colors is None else colors
    for mask, color in zip(masks, colors):
        mask = mask.astype(bool)
        out[mask] = ((1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)).astype(np.uint8)
        if not outline:
            continue
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), max(1, min(image.shape[:2]) // 300))
    return out


def draw_prompt(image: np.ndarray, box: Optional[Sequence[float]] = None, points: Optional[np.ndarray] = None,
                labels: Optional[np.ndarray] = None, radius: Optional[int] = None, hollow: bool = False) -> np.ndarray:
    """Draw a box (x1, y1, x2, y2) in blue and points (K, 2) with labels (K,): positive green,
    negative red, both with a white ring so they show on any background. hollow: rings only,
    so what lies under the point (a small object) stays visible."""
    out = image.copy()
    thick = max(1, min(image.shape[:2]) // 200)
    if box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BLUE, thick)
    if points is not None:
        radius = radius or max(3, min(image.shape[:2]) // 80)
        for (x, y), label in zip(np.asarray(points), np.asarray(labels)):
            centre, color = (int(round(x)), int(round(y))), GREEN if label > 0 else RED
            if hollow:
                cv2.circle(out, centre, radius, WHITE, thick + 1)
                cv2.circle(out, centre, radius, color, thick)
                continue
            cv2.circle(out, centre, radius + thick, WHITE, -1)
            cv2.circle(out, centre, radius, color, -1)
    return out


def fit(image: np.ndarray, side: int, height: Optional[int] = None) -> np.ndarray:
    """The image scaled to fit inside side x side (or height x side), keeping its aspect ratio,
    padded black at the bottom and right."""
    height = side if height is None else height
    h, w = image.shape[:2]
    scale = min(side / w, height / h)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.zeros((height, side, 3), np.uint8)
    out[:nh, :nw] = resized
    return out


def grid(rows: List[List[np.ndarray]], titles: List[str], row_labels: List[str], cell: int = 160,
         cell_height: Optional[int] = None) -> np.ndarray:
    """A labelled table of pictures: ``titles`` above the columns, ``row_labels`` written in the
    first cell of each row. Every picture is fitted into a cell x cell square (cell wide and
    cell_height high when given: pictures of one landscape image need no square)."""
    header = 22
    ch = cell if cell_height is None else cell_height
    n_cols = len(titles)
    out = np.full((header + len(rows) * (ch + 2), n_cols * (cell + 2), 3), 255, np.uint8)
    for c, title in enumerate(titles):
        cv2.putText(out, title, (c * (cell + 2) + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        top = header + r * (ch + 2)
        for c, picture in enumerate(row):
            out[top : top + ch, c * (cell + 2) : c * (cell + 2) + cell] = fit(picture, cell, ch)
        cv2.putText(out, label, (4, top + ch - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, WHITE, 1, cv2.LINE_AA)
    return out


def save_rgb(path, image: np.ndarray) -> None:
    """Write an RGB image (OpenCV writes BGR); a failed write is an error naming the file."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
