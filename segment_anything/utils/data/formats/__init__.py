"""The data formats: each lists its candidate samples (`scan`) and turns one into a Record (`build`).

Listing finds structural problems (a mask without an image, JSON that does not parse); building
reads every file once and finds the rest (unreadable, size mismatch, no objects). Both kinds are
`Problem`s, reported together by `prepare_data`. Object enumeration and --min_area dropping happen
here, so every format counts its dropped objects the same way.
"""

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ...image_spec import ImageSpec
from ..checks import BadSample, DataError, Problem
from ..image_io import exif_orientation
from ..records import MergedRecord, Record

DATA_FORMATS = ("auto", "folder", "objects", "instance_map", "labelme", "coco")  # --data_format
INSTANCE_MODES = ("per_object", "per_image")  # --instance_mode

IMAGE_DIRS = ("image", "images", "img")
MASK_DIRS = ("mask", "masks", "label", "labels", "gt")


@dataclass(frozen=True)
class DataOptions:
    """What the data flags ask for (`from_flags`)."""

    data_format: str = "auto"
    instance_mode: str = "per_object"
    min_area: int = 0  # pixels; smaller objects are dropped and counted
    mask_threshold: int = 127  # JPEG masks: value > threshold is foreground
    labels: Tuple[str, ...] = ()  # labelme: keep only these labels
    categories: Tuple[str, ...] = ()  # COCO: keep only these category names
    foreground_values: Tuple[int, ...] = ()  # folder/instance_map: label values that are objects
    image_spec: ImageSpec = ImageSpec()  # --channels, --intensity_range, --plane

    @classmethod
    def from_flags(cls, data_format: str = "auto", instance_mode: str = "per_object", min_area: int = 0,
                   mask_threshold: int = 127, labels: Optional[str] = None, categories: Optional[str] = None,
                   foreground_values: Optional[str] = None, channels: Optional[str] = "",
                   intensity_range: Optional[str] = "auto", plane: Optional[int] = None) -> "DataOptions":
        """From the values of the data flags (DATA_FLAGS) as given on a command line."""
        problems = option_errors(min_area, mask_threshold)
        if problems:
            raise ValueError(problems[0])
        names = tuple(_split(foreground_values))
        numeric = all(v.lstrip("-").isdigit() for v in names)
        labels, categories = _split(labels), _split(categories)
        if names and not numeric:  # class names: what --labels / --categories mean
            labels, categories = labels or names, categories or names
        spec = ImageSpec.from_flags(channels, intensity_range, plane)
        return cls(data_format, instance_mode, min_area, mask_threshold, tuple(labels),
                   tuple(categories), tuple(int(v) for v in names) if numeric else (), spec)


def option_errors(min_area: int, mask_threshold: int) -> List[str]:
    """The numeric data flags' problems (run.py lists them with its other flag errors; the tools
    stop at the first)."""
    errors = []
    if min_area < 0:
        errors.append(f"--min_area must be >= 0, got {min_area}")
    if not 0 <= mask_threshold < 255:
        errors.append(f"--mask_threshold must be in [0, 254], got {mask_threshold}")
    return errors


# The flags DataOptions.from_flags reads: every data tool and run.py has them under these names.
DATA_FLAGS = ("data_format", "instance_mode", "min_area", "mask_threshold", "labels", "categories",
              "foreground_values", "channels", "intensity_range", "plane")


def _split(text: Optional[str]) -> List[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


@dataclass
class Built:
    """A checked record, what was dropped from it, and a hash of its decoded pixels."""

    record: Record
    drops: Dict[str, int]  # why -> objects dropped (a plain dict: quicker to pass between processes and store)
    digest: str


@dataclass
class Scan:
    """Candidates of one split and how to check them."""

    fmt: str
    source: str  # the folder or JSON file (named in messages)
    candidates: list
    build: Callable[[object], Built]
    problems: List[Problem] = field(default_factory=list)
    # --plane all (data.planes): (image file or None, label files) of a candidate, and the
    # format's build with other options (the plane).
    files: Optional[Callable[[object], Tuple[Optional[str], Tuple[str, ...]]]] = None
    build_with: Optional[Callable[[object, DataOptions], Built]] = None


def finish(record: Record, image: np.ndarray, masks: Optional[np.ndarray], opts: DataOptions,
           drops: Optional[Counter] = None, areas: Optional[np.ndarray] = None) -> Built:
    """Drop empty and too small objects, refuse a record left without objects, apply
    --instance_mode. masks: the record's uint8 (N, H, W), already loaded by the format, or None
    with areas (N,) given instead (a label map counts them without N full-size masks)."""
    drops = Counter() if drops is None else drops
    if areas is None:
        areas = masks.reshape(len(masks), -1).sum(1) if len(masks) else np.zeros(0)
    areas = np.asarray(areas).tolist()  # a few numbers: Python's own are faster to compare than numpy's
    keep = [i for i, a in enumerate(areas) if a > 0 and a >= opts.min_area]
    drops["empty"] += areas.count(0)
    drops["smaller than --min_area"] += sum(1 for a in areas if 0 < a < opts.min_area)
    if not keep:
        why = ", ".join(f"{n} {k}" for k, n in drops.items() if n) or "none annotated"
        where = record.image if record.source == record.image else f"{record.image} ({record.source})"
        raise BadSample("no objects", f"{where}: no objects left ({why})")
    record = record.subset(keep) if len(keep) < len(areas) else record
    if opts.instance_mode == "per_image":
        record = MergedRecord.of(record)
    # The pixels, not copied. SHA-256 has instructions on current x86 and ARM cores: twice
    # BLAKE2b's rate on the checking path of a 2-core AMD EPYC.
    digest = hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()[:32]
    return Built(record, dict(+drops), digest)


def size_mismatch(image_name: str, image: np.ndarray, mask_name: str, mask_hw: Tuple[int, int]) -> BadSample:
    (h, w), (mh, mw) = image.shape[:2], mask_hw
    hint = ""
    if (h, w) == (mw, mh):
        hint = "; the sizes are transposed"
        path = Path(image_name)
        if path.is_file() and exif_orientation(path.read_bytes()) >= 5:
            hint += (": the image's EXIF orientation rotates it by 90 degrees (applied here, as viewers "
                     "and annotation tools show it), and the mask matches the unrotated pixels")
    return BadSample("size mismatch", f"size mismatch: image {image_name} is {w}x{h}, mask {mask_name} "
                                      f"is {mw}x{mh} (WxH){hint}")


def find_dir(root: Path, names: Tuple[str, ...]) -> Optional[Path]:
    """The one subfolder of root named like one of names; DataError if there are several."""
    found = [root / n for n in names if (root / n).is_dir()]
    # Case-insensitive file systems list one folder under several spellings.
    unique = {p.resolve() for p in found}
    if len(unique) > 1:
        raise DataError(f"{root}: several folders could be meant ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


LAYOUTS = {"folder": "images/ + labels/", "objects": "<id>/images/ + <id>/masks/ per sample",
           "labelme": "labelme *.json files"}


def layout_hint(fmt: str, root: Path) -> str:
    """When an explicit --data_format finds nothing usable: '; <root> looks like the X layout (...)
    : --data_format X', or '' when the folder looks like fmt or like nothing known. instance_map
    shares the folder layout (its masks hold instance ids), so a folder guess is no hint for it."""
    try:
        guess = detect(root)
    except DataError:
        return ""
    if guess == fmt or (fmt == "instance_map" and guess == "folder"):
        return ""
    return f"; {root} looks like the {guess} layout ({LAYOUTS[guess]}): --data_format {guess}, or leave it at auto"


def detect(root: Path) -> str:
    """folder, objects or labelme from the folder's layout (instance_map is never guessed)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if find_dir(root, IMAGE_DIRS) and find_dir(root, MASK_DIRS):
        return "folder"
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subdirs and any(find_dir(d, IMAGE_DIRS) and find_dir(d, MASK_DIRS) for d in subdirs[:50]):
        return "objects"
    if next(iter(root.rglob("*.json")), None) is not None:
        return "labelme"
    raise DataError(
        f"{root}: cannot tell the data format. Expected one of: {root}/images/ + {root}/labels/ "
        f"(folder; also image|img with mask|masks|label|gt), {root}/<id>/images/ + {root}/<id>/masks/ "
        f"(objects), labelme *.json files; or give --data_format (instance_map is never guessed); "
        "COCO data is its instances JSON with the folder of its images (the *_json and *_images flags)"
    )
