"""Decoded pixels as planes x channels: TIFF stacks through tifffile, every other file through OpenCV.

OpenCV reads one page of a TIFF and at most four channels; microscopy files are z-stacks, time
series and multi-channel hyperstacks of 16-bit or float data. tifffile reads a file's first series
with its axis labels (ImageJ hyperstacks, OME-TIFF, tifffile's own shaped files): the channel axes
(C, S) become channels, Y and X the image, and every other axis (Z, T, or a bare page sequence)
counts planes in file order (T=2, Z=3: plane 4 is t=1, z=1). A file tifffile cannot decode (LZW or
JPEG compression need the optional imagecodecs package) goes through OpenCV's multi-page decoder:
its pages are planes, without axis labels.
"""

import contextlib
import io
import logging
import math
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np
import tifffile

from .checks import BadSample

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
CHANNEL_AXES = "CS"
ORIENTATION_TAG = 274  # TIFF's (and EXIF's) orientation


@dataclass
class Planes:
    array: np.ndarray  # (P, H, W, C), channels in file order (RGB order for colour images)
    axes: str = ""  # the plane axes, e.g. "TZ"; "" for a plain image
    shape: Tuple[int, ...] = ()  # their sizes
    alpha: bool = False  # the last channel is transparency
    bare: bool = False  # one unlabelled page axis: the pages may as well be channels

    @property
    def count(self) -> int:
        return self.array.shape[0]

    def describe(self) -> str:
        sizes = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return f"{self.count} planes ({'pages' if self.bare else sizes})"

    def where(self, plane: int) -> str:
        """'plane 4 (T=1, Z=1)': the plane and, for several plane axes, its index on each."""
        return plane_where(plane, self.axes, self.shape)

    def as_channels(self) -> "Planes":
        """Bare pages of one channel each read as the channels of one image."""
        return Planes(np.moveaxis(self.array[..., 0], 0, -1)[None])


def plane_where(plane: int, axes: str, shape: Tuple[int, ...]) -> str:
    if len(axes) < 2:
        return f"plane {plane}"
    index = np.unravel_index(plane, shape)
    return f"plane {plane} ({', '.join(f'{a}={int(i)}' for a, i in zip(axes, index))})"


def plane_name(path: str, plane: int) -> str:
    """'stack.tif plane 5 (T=1, Z=1)' from the file's TIFF header alone (no pixels decoded), for
    messages about a record; 'stack.tif plane 5' when the header does not say more."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
        kept = [(a, n) for a, n in zip(axes, shape) if a not in CHANNEL_AXES + "YX"]
        where = plane_where(plane, "".join(a for a, _ in kept), tuple(n for _, n in kept))
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads, or a plane out of its range: the index alone
        where = f"plane {plane}"
    return f"{path} {where}"


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


_QUIET = {"lock": threading.Lock(), "readers": 0, "levels": None}


@contextlib.contextmanager
def readers_quiet():
    """tifffile's warnings and OpenCV's TIFF errors off stderr while a file is read: a damaged
    file is reported once, by the BadSample naming it (with the readers' reasons). The levels
    are process-wide: the first of the checking threads to enter sets them, the last to leave
    puts them back."""
    log = logging.getLogger("tifffile")
    with _QUIET["lock"]:
        if _QUIET["readers"] == 0:
            _QUIET["levels"] = log.level, cv2.utils.logging.getLogLevel()
            log.setLevel(logging.CRITICAL)
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _QUIET["readers"] += 1
    try:
        yield
    finally:
        with _QUIET["lock"]:
            _QUIET["readers"] -= 1
            if _QUIET["readers"] == 0:
                log.setLevel(_QUIET["levels"][0])
                cv2.utils.logging.setLogLevel(_QUIET["levels"][1])


def read_tiff(data: bytes, name: str) -> Planes:
    with readers_quiet():
        return _read_tiff(data, name)


def _read_tiff(data: bytes, name: str) -> Planes:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            array, axes, page = series.asarray(), series.axes, tif.pages[0]
            alpha = (page.photometric == tifffile.PHOTOMETRIC.RGB and page.samplesperpixel == 4
                     and array.dtype == np.uint8 and any(int(e) in (1, 2) for e in page.extrasamples))
    except Exception as err:  # noqa: BLE001 - any reader failure: OpenCV decides, then the error names both
        return opencv_pages(data, name, f"{type(err).__name__}: {err}")
    if "Y" not in axes or "X" not in axes:
        raise BadSample("unreadable", f"{name}: TIFF series has axes {axes!r}, no Y and X image axes")
    planes = [i for i, a in enumerate(axes) if a not in CHANNEL_AXES + "YX"]
    chans = [i for i, a in enumerate(axes) if a in CHANNEL_AXES]
    array = np.transpose(array, planes + [axes.index("Y"), axes.index("X")] + chans)
    plane_shape = tuple(array.shape[:len(planes)])
    h, w = array.shape[len(planes):len(planes) + 2]
    array = array.reshape(math.prod(plane_shape), h, w, math.prod(array.shape[len(planes) + 2:]))
    plane_axes = "".join(axes[i] for i in planes)
    return Planes(array, plane_axes, plane_shape, alpha, bare=len(planes) == 1 and plane_axes in "IQ" and not chans)


def tiff_plane(source, plane: int) -> Optional[Tuple[np.ndarray, str, bool, int]]:
    """One plane of a TIFF (source: its path, or its bytes) read from the file's headers and that
    plane's pages alone: (H, W, C), its name ('plane 4 (T=1, Z=1)'), whether the last channel is
    alpha, and the first page's orientation tag (1..8, 1 = as stored). None when the file does not
    allow it (not a TIFF tifffile reads, pages that are not one image each, a plane it does not
    have): read_tiff then reads it all. A plane of a large stack costs its pages, not the stack."""
    if isinstance(source, bytes) and not is_tiff(source):
        return None
    try:
        with readers_quiet(), tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source) as tif:
            series = tif.series[0]
            axes, shape, page_axes = series.axes, tuple(series.shape), series.keyframe.axes
            outer, outer_shape = axes[:len(axes) - len(page_axes)], shape[:len(axes) - len(page_axes)]
            if (not axes.endswith(page_axes) or "Y" not in page_axes or math.prod(outer_shape) != len(series.pages)
                    or any(a in CHANNEL_AXES for a in page_axes[:page_axes.index("Y")])):
                return None
            planes = [i for i, a in enumerate(outer) if a not in CHANNEL_AXES]
            chans = [i for i, a in enumerate(outer) if a in CHANNEL_AXES]
            plane_shape = tuple(outer_shape[i] for i in planes)
            if not plane_shape or plane >= math.prod(plane_shape):
                return None
            index = [0] * len(outer)
            for i, v in zip(planes, np.unravel_index(plane, plane_shape)):
                index[i] = int(v)
            pages = []
            for c in np.ndindex(*(outer_shape[i] for i in chans)):
                for i, v in zip(chans, c):
                    index[i] = v
                pages.append(int(np.ravel_multi_index(index, outer_shape)))
            array = tif.asarray(key=pages, series=0)
            page = series.pages[pages[0]]
            alpha = (page.photometric == tifffile.PHOTOMETRIC.RGB and page.samplesperpixel == 4
                     and array.dtype == np.uint8 and any(int(e) in (1, 2) for e in page.extrasamples))
            tag = tif.pages[0].tags.get(ORIENTATION_TAG)
            orientation = int(tag.value) if tag is not None and 1 <= int(tag.value) <= 8 else 1
    except Exception:  # noqa: BLE001 - anything unusual: the whole file is read as before
        return None
    h, w = shape[axes.index("Y")], shape[axes.index("X")]
    array = array.reshape(len(pages), h, w, -1)  # pages (channels of the outer axes), Y, X, samples
    array = np.moveaxis(array, 0, 2).reshape(h, w, -1)  # channels in file order, as read_tiff orders them
    plane_axes = "".join(outer[i] for i in planes)
    return array, plane_where(plane, plane_axes, plane_shape), alpha, orientation


def opencv_pages(data: bytes, name: str, tifffile_error: str) -> Planes:
    """A TIFF's pages through OpenCV (BGR converted to RGB)."""
    try:
        ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        ok, pages = False, []
    if not ok or not pages:
        raise BadSample("unreadable", f"{name}: cannot read TIFF ({tifffile_error})")
    pages = [p[..., None] if p.ndim == 2 else p for p in pages]
    if any(p.shape != pages[0].shape or p.dtype != pages[0].dtype for p in pages):
        raise BadSample("unreadable", f"{name}: TIFF pages differ in size or type; cannot read them as one stack")
    array = np.stack(pages)
    channels = array.shape[3]
    if channels in (3, 4):
        array = array[..., [2, 1, 0, 3][:channels]]
    return Planes(array, "I" if len(pages) > 1 else "", (len(pages),) if len(pages) > 1 else (),
                  alpha=channels in (2, 4), bare=len(pages) > 1 and channels == 1)
