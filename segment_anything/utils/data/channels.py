"""How decoded pixels of any depth and channel count become SAM's uint8 RGB, as an ImageSpec says.

Without `--channels`, a one-channel image is repeated and a three-channel one used as is; any
other count is an error naming the file, because guessing which three of four fluorescence
channels matter would silently train on the wrong signal. Scaling (`to_uint8`) applies to images
deeper than 8 bits only: "auto" maps a channel's own min..max to 0..255 when --channels picks
channels (each stain has its own brightness), and the whole image's min..max otherwise (keeping an
RGB image's colour balance).
"""

from typing import Sequence, Tuple

import cv2
import numpy as np

from ..image_spec import ImageSpec, Range
from .checks import BadSample


def to_uint8(array: np.ndarray, intensity_range: Range = None) -> np.ndarray:
    """uint8 as is; other depths scaled linearly from (lo, hi) to 0..255 (default: the data's own
    min..max, so 12-bit data in a 16-bit file uses the full 8-bit range)."""
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float32)
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    if intensity_range:
        lo, hi = intensity_range
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo = hi = 0.0
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return np.nan_to_num(np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255), nan=0.0).round().astype(np.uint8)


def default_channels(count: int, alpha: bool, name: str) -> Tuple[int, int, int]:
    usable = count - 1 if alpha else count
    if usable == 1:
        return (0, 0, 0)
    if usable == 3:
        return (0, 1, 2)
    raise BadSample("channels", f"{name}: {count} channels, --channels not given: pick three with --channels 0,1,2 "
                                f"(or one, repeated, with --channels 0)")


def _pick_uint8(array: np.ndarray, picked: Tuple[int, ...]) -> np.ndarray:
    """The picked channels of uint8 (H, W, C) as a contiguous (H, W, 3), without numpy's indexed
    copy (slow on large images) where a slice or OpenCV does it."""
    if picked == (0, 1, 2):
        return array if array.shape[2] == 3 and array.flags.c_contiguous else np.ascontiguousarray(array[..., :3])
    if picked == (0, 0, 0):
        return cv2.cvtColor(np.ascontiguousarray(array[..., 0]), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(array[..., list(picked)])


def to_rgb(array: np.ndarray, spec: ImageSpec, name: str, alpha: bool = False) -> np.ndarray:
    """(H, W) or (H, W, C) of any depth -> uint8 (H, W, 3) as spec says. alpha: the last channel
    is transparency (left out unless --channels picks it)."""
    if array.ndim == 2:
        array = array[..., None]
    count = array.shape[2]
    picked: Sequence[int] = spec.channels or default_channels(count, alpha, name)
    if len(picked) == 1:
        picked = tuple(picked) * 3
    missing = sorted({c for c in picked if c >= count})
    if missing:
        raise BadSample("channels", f"{name}: --channels {','.join(map(str, spec.channels))} asks for channel "
                                    f"{missing[0]}, the image has {count} (0..{count - 1})")
    if array.dtype == np.uint8:
        return _pick_uint8(array, tuple(picked))
    if not spec.channels and len(spec.ranges) <= 1:  # one range (given or auto) over the picked channels
        return to_uint8(array[..., list(picked)], spec.ranges[0] if spec.ranges else None)
    ranges = spec.ranges * 3 if len(spec.ranges) == 1 else spec.ranges or (None,) * 3
    done = {}
    out = np.empty(array.shape[:2] + (3,), np.uint8)
    for i, (c, r) in enumerate(zip(picked, ranges)):
        if (c, r) not in done:
            done[(c, r)] = to_uint8(array[..., c], r)
        out[..., i] = done[(c, r)]
    return out
