"""Strict image and mask reading: a file is decoded completely or it is a named error.

OpenCV decodes a JPEG cut in half with only a "Premature end of JPEG file" warning and a grey
bottom half; here a JPEG without its end marker is re-checked by Pillow's strict decoder and
reported as unreadable. Files are read as bytes and decoded with cv2.imdecode, so non-ASCII paths
work on every platform. EXIF orientation is applied (as photo viewers and annotation tools show
the image). High-bit-depth images (12-bit microscopy in 16-bit files, float TIFFs) are scaled to
8 bits by their own range (per image min..max) or by a fixed `intensity_range` (lo, hi).
"""

import io
from pathlib import Path
from typing import Iterable, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from .checks import BadSample

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LOSSY = frozenset({".jpg", ".jpeg"})
BINARY_SETS = ({0, 1}, {0, 255}, {0, 65535})
EXIF_ORIENTATION = 0x0112

IntensityRange = Optional[Tuple[float, float]]


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in EXTENSIONS


def read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing file", f"{path}: file does not exist") from None
    except OSError as err:
        raise BadSample("unreadable", f"{path}: cannot read file ({err})") from None
    if not data:
        raise BadSample("zero-byte file", f"{path}: file is empty (0 bytes)")
    return data


def _check_complete_jpeg(data: bytes, name: str) -> None:
    """Raise for a truncated JPEG: no end-of-image marker and Pillow's strict decoder fails."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9":
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # strict: raises on missing data (ImageFile.LOAD_TRUNCATED_IMAGES is False)
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSample("unreadable", f"{name}: truncated or corrupt JPEG ({err})") from None


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8; 1 = as stored), 1 when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse just has no orientation
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip (H, W, ...) as EXIF orientation 1..8 says, like PIL.ImageOps.exif_transpose."""
    a = array
    ops = {
        2: lambda: a[:, ::-1],
        3: lambda: a[::-1, ::-1],
        4: lambda: a[::-1],
        5: lambda: a.swapaxes(0, 1),
        6: lambda: np.rot90(a, -1),
        7: lambda: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation]()) if orientation in ops else a


def _decode(data: bytes, name: str, flags: int) -> np.ndarray:
    _check_complete_jpeg(data, name)
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:
        raise BadSample("unreadable", f"{name}: cannot read image ({err})") from None
    if array is None or array.size == 0:
        raise BadSample("unreadable", f"{name}: cannot read image (corrupt, truncated or not an image)")
    return array


def to_uint8(array: np.ndarray, intensity_range: IntensityRange = None) -> np.ndarray:
    """uint8 as is; other depths scaled linearly from (lo, hi) to 0..255 (default: the image's
    own min..max, so 12-bit data in a 16-bit file uses the full 8-bit range)."""
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float32)
    lo, hi = intensity_range if intensity_range else (float(a.min()), float(a.max()))
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def decode_image(data: bytes, name: str, intensity_range: IntensityRange = None) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, 3) RGB; EXIF orientation applied, alpha dropped."""
    array = _decode(data, name, cv2.IMREAD_UNCHANGED)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    array = to_uint8(array, intensity_range)
    if array.ndim == 2:
        rgb = cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    elif array.shape[2] == 2:  # grey + alpha
        rgb = cv2.cvtColor(np.ascontiguousarray(array[..., 0]), cv2.COLOR_GRAY2RGB)
    elif array.shape[2] == 4:
        rgb = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    else:
        rgb = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return apply_orientation(rgb, exif_orientation(data))


def load_image(path, intensity_range: IntensityRange = None) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB (see the module docstring)."""
    path = Path(path)
    return decode_image(read_bytes(path), str(path), intensity_range)


def _palette_indices(data: bytes, path: Path) -> Optional[np.ndarray]:
    """The index plane of a palette ("P") image, None for any other image (or non-image)."""
    try:
        im = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError):
        return None  # not something Pillow knows: cv2 decides below
    with im:
        if im.mode not in ("P", "PA"):
            return None
        try:
            im.load()
        except OSError as err:
            raise BadSample("unreadable", f"{path}: cannot read image ({err})") from None
        return np.array(im.getchannel(0) if im.mode == "PA" else im)


def read_label(path) -> np.ndarray:
    """A mask or label image as integers (H, W): palette PNGs give their indices, colour masks
    are converted to grey, 16-bit values are kept. No EXIF rotation (masks are written as stored)."""
    path = Path(path)
    data = read_bytes(path)
    palette = _palette_indices(data, path)
    if palette is not None:
        return palette
    array = _decode(data, str(path), cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[..., :3]
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_BGR2GRAY) if array.shape[2] == 3 else array[..., 0]
    return array


def _shown(values: np.ndarray, limit: int = 5) -> str:
    return ", ".join(str(v) for v in values[:limit].tolist()) + (", ..." if values.size > limit else "")


def load_mask(path, threshold: int = 127, foreground_values: Optional[Iterable[int]] = None) -> np.ndarray:
    """Read a binary mask as uint8 (H, W) in {0, 1}.

    foreground_values: the label values that are the object (others are background).
    Otherwise lossless files must hold only {0, 1}, {0, 255} or {0, 65535}: any other value means
    the file is a label map or an anti-aliased drawing, and guessing would train on wrong targets.
    JPEG masks carry compression noise and are thresholded: value > threshold -> 1.
    """
    path = Path(path)
    labels = read_label(path)
    if foreground_values:
        return np.isin(labels, list(foreground_values)).astype(np.uint8)
    if path.suffix.lower() in LOSSY:
        return (labels > threshold).astype(np.uint8)
    values = np.unique(labels)
    if any(set(values.tolist()) <= allowed for allowed in BINARY_SETS):
        return (labels != 0).astype(np.uint8)
    bad = values[values != 0]
    raise BadSample(
        "not binary",
        f"{path}: mask is not binary; expected only {{0, 1}} or {{0, 255}} (or {{0, 65535}}), found "
        f"{bad.size} non-zero value(s): {_shown(bad)}; --foreground_values picks the object's values, "
        "--data_format instance_map reads one object per value",
    )
