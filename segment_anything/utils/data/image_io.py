"""Strict image and mask reading: a file is decoded completely or it is a named error.

OpenCV decodes a JPEG cut in half with only a "Premature end of JPEG file" warning and a grey
bottom half; here a JPEG without its end marker is re-checked by Pillow's strict decoder and
reported as unreadable. Files are read as bytes and decoded with cv2.imdecode, so non-ASCII paths
work on every platform. EXIF orientation is applied (as photo viewers and annotation tools show
the image). TIFF files are read through tifffile (stacks, many channels, any depth; stacks.py);
an `ImageSpec` (channels.py) picks the plane and the channels and scales deeper data to 8 bits.
"""

import contextlib
import io
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from ..image_spec import ImageSpec, as_spec
from .channels import to_rgb, to_uint8  # noqa: F401 (to_uint8: the one scaling, used by formats and tests)
from .checks import BadSample
from .stacks import Planes, is_tiff, read_tiff, tiff_plane

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LOSSY = frozenset({".jpg", ".jpeg"})
BINARY_TOPS = (1, 255, 65535)  # a lossless binary mask holds 0 and one of these
EXIF_ORIENTATION = 0x0112

IntensityRange = Optional[Tuple[float, float]]
SpecLike = Union[ImageSpec, IntensityRange]  # a plain (lo, hi) range reads as ImageSpec(ranges=((lo, hi),))


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in EXTENSIONS


def read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:  # a str or a Path (pathlib's own read costs more per file)
            data = f.read()
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_has_exif(data: bytes) -> bool:
    """Whether the PNG's chunk list holds an eXIf chunk (True also when the list is damaged: then
    Pillow decides)."""
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        kind = data[pos + 4:pos + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return True


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8; 1 = as stored), 1 when absent or unreadable."""
    if data.startswith(PNG_SIGNATURE) and not _png_has_exif(data):
        # Pillow would decode the whole image looking for the chunk (PNG allows it after the
        # pixels): a second decode of every PNG.
        return 1
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


_KEPT = threading.local()  # .files: {path: [bytes, Planes or None]} while kept_decoded() is active here


@contextlib.contextmanager
def kept_decoded():
    """Within it, each file read in this thread is read and decoded once: checking every plane of
    a stack (data.planes) reads the image and label stacks once, not once per plane. Off
    elsewhere, so training's loaders keep no decoded stacks."""
    _KEPT.files = {}
    try:
        yield
    finally:
        _KEPT.files = None


def _file(path) -> list:
    """[bytes, Planes or None (not decoded yet)] of a file, kept while kept_decoded() is active."""
    files = getattr(_KEPT, "files", None)
    entry = files.get(str(path)) if files is not None else None
    if entry is None:
        entry = [read_bytes(path), None]
        if files is not None:
            files[str(path)] = entry
    return entry


def _one_plane(path, plane: Optional[int]):
    """tiff_plane's (H, W, C), name, alpha, orientation: one plane of a TIFF stack read from its
    headers and its own pages (a training item of a large stack), or None: not a TIFF, no plane
    asked, or kept_decoded() keeps the whole file for all its planes. Any problem with the file
    is None too: the whole-file read then names it."""
    if plane is None or getattr(_KEPT, "files", None) is not None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return tiff_plane(str(path), plane) if is_tiff(head) else None


def _planes(path, data: bytes) -> Planes:
    """The file's bytes decoded; kept with them while kept_decoded() is active."""
    files = getattr(_KEPT, "files", None)
    entry = files.get(str(path)) if files is not None else None
    if entry is None:
        return decode_planes(data, str(path))
    if entry[1] is None:
        entry[1] = decode_planes(entry[0], str(path))
    return entry[1]


def _read_decoded(path) -> Tuple[bytes, Planes]:
    data = _file(path)[0]
    return data, _planes(path, data)


def decode_planes(data: bytes, name: str) -> Planes:
    """Encoded bytes -> every plane and channel, any depth (TIFF: tifffile; others: OpenCV)."""
    if is_tiff(data):
        return read_tiff(data, name)
    array = _decode(data, name, cv2.IMREAD_UNCHANGED)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[2] in (3, 4):  # BGR(A) -> RGB(A)
        if array.dtype in (np.uint8, np.uint16, np.float32):  # OpenCV's swap: much faster than an indexed copy
            array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB if array.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
        else:
            array = array[..., [2, 1, 0, 3][:array.shape[2]]]
    return Planes(array[None], alpha=array.shape[2] in (2, 4))


def _as_read(planes: Planes, spec: ImageSpec) -> Planes:
    """Bare one-channel pages are the channels of one image when --channels picks among them."""
    if planes.bare and spec.channels and spec.plane is None and planes.array.shape[3] == 1:
        return planes.as_channels()
    return planes


def select_plane(planes: Planes, spec: ImageSpec, name: str) -> Tuple[np.ndarray, str]:
    """(H, W, C) of the plane spec asks for, and the name to use in messages (file and plane)."""
    planes = _as_read(planes, spec)
    if spec.plane is None:
        if planes.count > 1:
            hint = "; or --channels to read the pages as channels" if planes.bare else ""
            raise BadSample("stack", f"{name}: {planes.describe()}, --plane not given: pick one with --plane N "
                                     f"(0..{planes.count - 1}){hint}")
        return planes.array[0], name
    if spec.plane >= planes.count:
        raise BadSample("plane", f"{name}: --plane {spec.plane} asked, the file has {planes.count} plane(s)")
    return planes.array[spec.plane], f"{name} {planes.where(spec.plane)}"


def decode_image(data: bytes, name: str, spec: SpecLike = None) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, 3) RGB; EXIF orientation applied, alpha dropped."""
    spec = as_spec(spec)
    planes = decode_planes(data, name)
    array, where = select_plane(planes, spec, name)
    return apply_orientation(to_rgb(array, spec, where, planes.alpha), exif_orientation(data))


def load_image(path, spec: SpecLike = None) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB (see the module docstring)."""
    spec = as_spec(spec)
    one = _one_plane(path, spec.plane)
    if one is not None:
        array, where, alpha, orientation = one
        return apply_orientation(to_rgb(array, spec, f"{path} {where}", alpha), orientation)
    data, planes = _read_decoded(path)
    array, where = select_plane(planes, spec, str(path))
    return apply_orientation(to_rgb(array, spec, where, planes.alpha), exif_orientation(data))


def plane_layout(path, spec: SpecLike = None) -> Planes:
    """The planes of an image file as spec reads them (`count` of them; bare pages that
    --channels reads as channels are one plane)."""
    return _as_read(_read_decoded(Path(path))[1], as_spec(spec))


def label_planes(path) -> Planes:
    """The planes of a label file (a palette image is one)."""
    if _palette_indices(_file(Path(path))[0], Path(path)) is not None:
        return Planes(np.zeros((1, 1, 1, 1), np.uint8))
    return _read_decoded(Path(path))[1]


def load_image_planes(path, spec: SpecLike = None, every: bool = False) -> Iterator[Tuple[Optional[int], str, np.ndarray]]:
    """(plane, name, uint8 RGB) for the plane spec names, or with `every` (--plane all) for each
    plane of a stack (z-stacks and time series read as separate images); plane is None for a
    plain image, and name holds the file and the plane."""
    path, spec = Path(path), as_spec(spec)
    data, planes = _read_decoded(path)
    planes = _as_read(planes, spec)
    orientation = exif_orientation(data)
    if spec.plane is None and (planes.count == 1 or not every):
        array, where = select_plane(planes, spec, str(path))
        yield None, where, apply_orientation(to_rgb(array, spec, where, planes.alpha), orientation)
        return
    for k in [spec.plane] if spec.plane is not None else range(planes.count):
        one = ImageSpec(spec.channels, spec.ranges, k)
        array, where = select_plane(planes, one, str(path))
        yield k, where, apply_orientation(to_rgb(array, one, where, planes.alpha), orientation)


def _palette_indices(data: bytes, path) -> Optional[np.ndarray]:
    """The index plane of a palette ("P") image, None for any other image (or non-image)."""
    if data.startswith(PNG_SIGNATURE) and len(data) > 25 and data[12:16] == b"IHDR" and data[25] != 3:
        return None  # a PNG's colour type (IHDR byte 9) says "not palette" without opening it
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


def read_label(path, plane: Optional[int] = None) -> np.ndarray:
    """A mask or label image as integers (H, W): palette PNGs give their indices, colour masks
    are converted to grey, 16-bit values are kept. No EXIF rotation (masks are written as stored).
    A label stack (TIFF) gives its `plane`; a single mask serves every plane of its image's stack."""
    one = _one_plane(path, plane)
    if one is not None:
        return _grey(one[0])  # a palette TIFF: tifffile gives its indices, as Pillow does below
    data = _file(path)[0]
    palette = _palette_indices(data, path)
    if palette is not None:
        return palette
    planes = _planes(path, data)
    if planes.count > 1:
        if plane is None:
            raise BadSample("stack", f"{path}: label stack of {planes.describe()}, --plane not given: pick one with "
                                     f"--plane N (0..{planes.count - 1})")
        if plane >= planes.count:
            raise BadSample("plane", f"{path}: --plane {plane} asked, the label stack has {planes.count} plane(s)")
    return _grey(planes.array[plane if planes.count > 1 else 0])


def _grey(array: np.ndarray) -> np.ndarray:
    """(H, W, C) label pixels -> (H, W): colour masks converted to grey, else the first channel."""
    if array.shape[2] in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(array[..., :3]), cv2.COLOR_RGB2GRAY)
    return array[..., 0]


def _shown(values: np.ndarray, limit: int = 5) -> str:
    return ", ".join(str(v) for v in values[:limit].tolist()) + (", ..." if values.size > limit else "")


def is_binary(labels: np.ndarray) -> bool:
    """True when the values are a subset of {0, t} for a t in BINARY_TOPS: every non-zero pixel
    equals the largest value, which is one of them (two counting passes, no sort)."""
    top = labels.max() if labels.size else 0
    if top == 0:
        return bool(labels.size == 0 or labels.min() == 0)
    return top in BINARY_TOPS and np.count_nonzero(labels) == np.count_nonzero(labels == top)


def load_mask(path, threshold: int = 127, foreground_values: Optional[Iterable[int]] = None,
              plane: Optional[int] = None) -> np.ndarray:
    """Read a binary mask as uint8 (H, W) in {0, 1}.

    foreground_values: the label values that are the object (others are background).
    Otherwise lossless files must hold only {0, 1}, {0, 255} or {0, 65535}: any other value means
    the file is a label map or an anti-aliased drawing, and guessing would train on wrong targets.
    JPEG masks carry compression noise and are thresholded: value > threshold -> 1.
    """
    labels = read_label(path, plane)
    if foreground_values:
        return np.isin(labels, list(foreground_values)).astype(np.uint8)
    if os.path.splitext(path)[1].lower() in LOSSY:
        return (labels > threshold).astype(np.uint8)
    if is_binary(labels):
        return (labels != 0).view(np.uint8)
    values = np.unique(labels)
    bad = values[values != 0]
    raise BadSample(
        "not binary",
        f"{path}: mask is not binary; expected only {{0, 1}} or {{0, 255}} (or {{0, 65535}}), found "
        f"{bad.size} non-zero value(s): {_shown(bad)}; --foreground_values picks the object's values, "
        "--data_format instance_map reads one object per value",
    )
