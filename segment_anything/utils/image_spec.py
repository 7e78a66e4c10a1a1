"""What turns an image file into SAM's three 8-bit channels: channels, intensity ranges, plane.

SAM's encoder takes RGB. Microscopy files hold one to many channels of 12/16-bit or float data,
often as z-stacks or time series; `ImageSpec` says which channels feed R, G and B (`--channels`,
e.g. ``0,1,1`` or ``0`` for one channel repeated), how each is scaled to 0..255
(`--intensity_range`, one range for all or one per channel) and which plane of a stack is the
image (`--plane N`), or that every plane is an image of its own (`--plane all`). Standard library
only: the training configuration checks its flags with it.
"""

import argparse
from dataclasses import dataclass
from typing import Optional, Tuple, Union

CHANNELS_HELP = ("channels that become SAM's R,G,B: three indices (e.g. 0,1,1) or one, repeated (0); "
                 "default: the file's own (one channel repeated, or three)")
RANGE_HELP = ("images deeper than 8 bits: auto (each picked channel's min..max; without --channels the image's), "
              "LO,HI mapped to 0..255, or one of these per channel separated by ';' (quote it: '0,4095;auto;0,900')")
PLANE_HELP = ("stacks (multi-page TIFF: z, time): N reads plane N of every image; all reads every plane as an image "
              "of its own (default: a stack is refused)")

Range = Optional[Tuple[float, float]]  # None: the data's own min..max


@dataclass(frozen=True)
class ImageSpec:
    channels: Tuple[int, ...] = ()  # () = the file's own (1 repeated, or 3); else 1 or 3 indices
    ranges: Tuple[Range, ...] = ()  # () = auto; one for every channel, or one per --channels entry
    plane: Optional[int] = None  # stacks: the plane read (planes counted over every non-channel axis)
    every: bool = False  # --plane all: each plane of a stack is an item of its own (data.planes)

    @classmethod
    def from_flags(cls, channels: Optional[str] = "", intensity_range: Optional[str] = "auto",
                   plane: Union[int, str, None] = None) -> "ImageSpec":
        """From the flag strings; ValueError naming the flag when one is malformed."""
        plane = parse_plane(plane)
        every = plane == "all"
        spec = cls(parse_channels(channels), parse_ranges(intensity_range), None if every else plane, every)
        spec.check()
        return spec

    def check(self) -> None:
        picked = len(self.channels) or 3
        if len(self.ranges) > 1 and len(self.ranges) != picked:
            raise ValueError(f"--intensity_range gives {len(self.ranges)} ranges; give one for all channels or one "
                             f"per channel ({picked}: {'as --channels lists' if self.channels else 'R;G;B'})")
        if self.plane is not None and self.plane < 0:
            raise ValueError(f"--plane must be >= 0, got {self.plane}")


def parse_plane(value: Union[int, str, None]) -> Union[int, str, None]:
    """--plane as given (an int, digits, 'all' or None) -> int, 'all' or None; ValueError naming the flag."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    if text == "all":
        return text
    if not text.isdigit():
        raise ValueError(f"--plane must be a plane index (0, 1, ...) or all, got {value!r}")
    return int(text)


def plane_flag(text: str) -> Union[int, str]:
    """argparse type of --plane: N or all, so N is an int wherever the flag went (args.json, cache key)."""
    try:
        return parse_plane(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_channels(text: Optional[str]) -> Tuple[int, ...]:
    """'' -> (); '0' -> (0,); '0,1,1' -> (0, 1, 1). One or three non-negative indices."""
    text = (text or "").strip()
    if not text:
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3) or min(values) < 0:
        raise ValueError(f"--channels must be one channel index (repeated into R, G, B) or three, e.g. 0 or "
                         f"0,1,1, got {text!r}")
    return values


def parse_ranges(text: Optional[str]) -> Tuple[Range, ...]:
    """'auto' -> (); 'LO,HI' -> ((lo, hi),); 'LO,HI;auto;LO,HI' -> one entry per channel."""
    text = (text or "auto").strip()
    if text == "auto":
        return ()
    ranges = []
    for part in text.split(";"):
        part = part.strip()
        if part == "auto":
            ranges.append(None)
            continue
        try:
            lo, hi = (float(v) for v in part.split(","))
        except ValueError:
            lo = hi = 0.0
        if not hi > lo:
            raise ValueError(f"--intensity_range must be auto, LO,HI with HI > LO, or one of these per channel "
                             f"separated by ';' (e.g. '0,4095;auto;100,2000'), got {text!r}")
        ranges.append((lo, hi))
    return tuple(ranges)


def as_spec(value) -> ImageSpec:
    """An ImageSpec from an ImageSpec, None, or a plain (lo, hi) range for every channel."""
    if value is None:
        return ImageSpec()
    if isinstance(value, ImageSpec):
        return value
    lo, hi = value
    return ImageSpec(ranges=((float(lo), float(hi)),))


FROM_WEIGHTS = "; default: what --weights was trained with"


def add_arguments(parser, plane_all: bool = True, from_weights: bool = False) -> None:
    """--channels, --intensity_range and --plane on a tool's parser (plane_all: --plane all reads
    every plane of a stack as its own image, else --plane takes an index only; from_weights: a flag
    left out takes the value the weights were trained with, see with_recorded)."""
    note = FROM_WEIGHTS if from_weights else ""
    parser.add_argument("--channels", default=None if from_weights else "", help=CHANNELS_HELP + note)
    parser.add_argument("--intensity_range", default=None if from_weights else "auto", help=RANGE_HELP + note)
    if plane_all:
        parser.add_argument("--plane", type=plane_flag, default=None, help=PLANE_HELP + note)
    else:
        parser.add_argument("--plane", type=int, default=None,
                            help="stacks (multi-page TIFF: z, time): the plane read as the image (default: a stack is refused)" + note)


def with_recorded(args, recorded: dict) -> list:
    """Fill the image flags left out (None) with ``recorded`` (save_weight.recorded_image_flags),
    in place; returns the notes that say which were taken from the weights ("--intensity_range 0,4095")."""
    notes = []
    for name in ("channels", "intensity_range", "plane"):
        if getattr(args, name, None) is None and recorded.get(name) is not None:
            setattr(args, name, recorded[name])
            if recorded[name] not in ("", "auto"):  # the defaults need no note
                notes.append(f"--{name} {recorded[name]}")
    return notes


def from_arguments(args) -> ImageSpec:
    """The ImageSpec of a tool's parsed flags (--plane all: plane None, every set)."""
    return ImageSpec.from_flags(args.channels, args.intensity_range, args.plane)
