"""prepare_data: every data file found and checked before any worker starts.

Train and validation data are listed and read once; every problem of both is reported in one
DataError, or with --skip_bad left out and listed (the engine writes them to <run>/skipped.txt).
Validation data that is the training data, or shares files with it, is refused; images with
identical pixels in both are named in a warning.
"""

import os
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..random_weights import DEFAULT_SEED
from .checks import DataError, Problem, raise_problems, run_checks, summary
from .formats import DataOptions, Scan, detect, folder, instance_map, labelme, layout_hint, objects
from .formats import coco as coco_format
from .manifest import Manifest
from .planes import StackCounts, flatten, stack_builder
from .records import Record

FOLDER_FORMATS = {"folder": folder, "objects": objects, "instance_map": instance_map, "labelme": labelme}


@dataclass
class Loaded:
    """One split after the checks."""

    fmt: str
    source: str
    records: List[Record]
    problems: List[Problem]
    drops: Counter
    digests: Dict[tuple, str]  # record_key -> hash of its decoded pixels
    total: int  # samples listed, bad ones included
    stacks: Optional[StackCounts] = None  # --plane all: stacks and planes


@dataclass(frozen=True)
class DataSources:
    """Where a run's data is and how to read it (training.config's resolve builds it from the
    flags; the names below are the flags')."""

    options: DataOptions
    train_dir: str = ""
    train_json: Optional[str] = None
    train_images: Optional[str] = None
    val_dir: Optional[str] = None
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    val_fraction: float = 0.2
    seed: int = DEFAULT_SEED
    skip_bad: bool = False


@dataclass
class RunData:
    train: List[Record]
    val: List[Record]
    notes: List[str]  # start-up log lines
    skipped: List[str] = field(default_factory=list)  # with --skip_bad: one line per left-out sample
    skip_summary: str = ""  # 'skipped 3 of 412 images: 2 unreadable, 1 size mismatch'


def scan(fmt: str, source: str, opts: DataOptions, images: Optional[str] = None) -> Scan:
    """List one split's candidates in format fmt ("auto": detected from the folder)."""
    if fmt == "coco":
        return coco_format.scan(source, images, opts)
    root = Path(source)
    if fmt == "auto":
        fmt = detect(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return FOLDER_FORMATS[fmt].scan(root, opts)


def load_split(fmt: str, source: str, opts: DataOptions, images: Optional[str] = None) -> Loaded:
    """List and check one split; problems are returned, not raised. An explicit format that finds
    nothing usable in a folder of another known layout is one DataError naming that layout."""
    hint = (lambda: "") if fmt in ("auto", "coco") else (lambda: layout_hint(fmt, Path(source)))
    try:
        found = scan(fmt, source, opts, images)
    except DataError as err:
        said = hint()
        if said:
            raise DataError(f"{str(err).splitlines()[0]}{said}") from None
        raise
    manifest = Manifest.open(found.fmt, found.source, opts, images)
    every = opts.image_spec.every
    build = stack_builder(found.files, found.build_with, opts) if every else found.build
    built, problems = run_checks(found.candidates, build, manifest=manifest)
    stacks = StackCounts() if every else None
    if every:
        built = flatten(built, stacks)
    said = "" if built else hint()
    if said:
        raise DataError(f"{source}: --data_format {fmt} finds no usable sample here{said}")
    drops = Counter()
    for b in built:
        drops.update(b.drops)
    digests = {record_key(b.record): b.digest for b in built}
    return Loaded(found.fmt, found.source, [b.record for b in built], found.problems + problems, drops,
                  digests, len(found.candidates) + len(found.problems), stacks)


def record_key(record: Record) -> tuple:
    """(file, plane): one image of a split (plane -1 for a 2-D image), in file order."""
    return record.image, -1 if record.plane is None else record.plane


def load_records(source: str, fmt: str = "auto", opts: Optional[DataOptions] = None,
                 images: Optional[str] = None, skip_bad: bool = False) -> List[Record]:
    """Checked records of one folder (or COCO JSON + images); DataError on any problem."""
    loaded = load_split(fmt, str(source), opts or DataOptions(fmt), images)
    if not skip_bad:
        raise_problems(loaded.problems, loaded.source)
    if not loaded.records:
        raise DataError(f"{loaded.source}: no usable images ({loaded.total} listed)")
    return loaded.records


def split_records(records: Sequence[Record], val_fraction: float = 0.2, seed: int = DEFAULT_SEED):
    """Seeded split into (train, val), each sorted by image; both non-empty; independent of order.
    Files are drawn, not records: every plane of a stack (--plane all) is on the same side."""
    files = sorted({r.image for r in records})
    if len(files) < 2:
        if len(records) > 1:
            raise DataError(f"need at least 2 files to split into train and val, got {len(records)} planes of one "
                            f"stack ({files[0]}): its planes stay on one side; give --val_dir")
        raise DataError(f"need at least 2 images to split into train and val, got {len(records)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    random.Random(seed).shuffle(files)
    n_val = min(max(round(len(files) * val_fraction), 1), len(files) - 1)
    val = set(files[:n_val])
    ordered = sorted(records, key=record_key)
    return [r for r in ordered if r.image not in val], [r for r in ordered if r.image in val]


def describe(records: Sequence[Record], drops: Counter, stacks: Optional[StackCounts] = None) -> str:
    """'52 images, 270 objects (per image min 3, median 5, max 10); dropped: 1 smaller than --min_area'
    (with --plane all, the stacks and planes they come from first)."""
    counts = [r.num_objects for r in records] or [0]
    text = (f"{len(records)} images, {sum(counts)} objects (per image min {min(counts)}, "
            f"median {statistics.median(counts):g}, max {max(counts)})")
    if stacks is not None:
        text = f"{stacks.line()}: " + text
    if drops:
        text += "; dropped objects: " + ", ".join(f"{n} {why}" for why, n in drops.most_common())
    return text


def mode_note(opts: DataOptions) -> str:
    if opts.instance_mode == "per_image":
        return "instance mode per_image: one box around all foreground of each image (the reference's behaviour)"
    return ("instance mode per_object: every object is its own prompt and target (folder masks: each "
            "connected component); --instance_mode per_image gives the reference's one box per image")


def _check_sources(src: DataSources) -> None:
    if src.val_dir and src.train_dir and Path(src.val_dir).resolve() == Path(src.train_dir).resolve():
        raise DataError(f"--val_dir {src.val_dir} is --train_dir: validation on the training images "
                        "measures nothing; give another folder, or leave --val_dir out for a seeded split")
    if src.val_json and src.train_json and Path(src.val_json).resolve() == Path(src.train_json).resolve():
        raise DataError(f"--val_json {src.val_json} is --train_json; give another file or leave it out for a seeded split")


def _identity(path: str):
    """The file behind a path (device, inode): one stat, where resolving the path takes one per
    component; two names of one file (a link, another spelling) have the same identity."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return str(Path(path).resolve())


WARNINGS_SHOWN = 5  # identical-content warnings named one by one; the rest are counted


def _overlap(train: Sequence[Record], val: Sequence[Record], digests: Dict[tuple, str]) -> List[str]:
    """Refuse shared image files; return warnings for identical pixels in both splits."""
    train_files = {_identity(r.image) for r in train}
    shared = sorted(r.image for r in val if _identity(r.image) in train_files)
    if shared:
        raise DataError(f"{len(shared)} image file(s) are in both the training and the validation data, e.g. "
                        + ", ".join(shared[:5]))
    by_digest = {digests[record_key(r)]: r for r in train}
    same = [(by_digest[digests[record_key(r)]], r) for r in val if digests[record_key(r)] in by_digest]
    warnings = [f"warning: identical image content in train and val: {a.describe()} and {b.describe()}"
                for a, b in same[:WARNINGS_SHOWN]]
    if len(same) > WARNINGS_SHOWN:
        warnings.append(f"warning: {len(same) - WARNINGS_SHOWN} more validation images have the content of a "
                        f"training image ({len(same)} in all)")
    return warnings


def prepare_data(src: DataSources) -> RunData:
    """Find and check every train/val sample; raise one DataError naming every bad file."""
    opts = src.options
    coco = opts.data_format == "coco" or (opts.data_format == "auto" and src.train_json)
    if coco and not (src.train_json and src.train_images):
        raise DataError("COCO data needs --train_json (instances JSON) and --train_images (its image folder)")
    if not coco and not src.train_dir:
        raise DataError("--train_dir is required (a folder of images and masks or labelme JSON files), "
                        "or --train_json + --train_images for COCO")
    _check_sources(src)
    fmt = "coco" if coco else opts.data_format
    train = load_split(fmt, src.train_json if coco else src.train_dir, opts, src.train_images)
    val_source = (src.val_json if coco else src.val_dir) or None
    if val_source and coco and not src.val_images:
        raise DataError("--val_json needs --val_images (its image folder)")
    val = load_split(train.fmt, val_source, opts, src.val_images) if val_source else None
    problems = train.problems + (val.problems if val else [])
    if not src.skip_bad:
        raise_problems(problems, "data check")
    for split in (train, val):
        if split is not None and not split.records:
            raise DataError(f"{split.source}: no usable images ({split.total} listed, {len(split.problems)} bad)")
    notes = [f"{train.source}: {train.fmt} format, " + describe(train.records, train.drops, train.stacks)]
    digests = dict(train.digests)
    if val is not None:
        notes.append(f"{val.source}: {val.fmt} format, " + describe(val.records, val.drops, val.stacks))
        train_records, val_records = train.records, val.records
        digests.update(val.digests)
    else:
        train_records, val_records = split_records(train.records, src.val_fraction, src.seed)
        kept = " (whole stacks: every plane of a file on one side)" if train.stacks is not None else ""
        notes.append(f"no validation data given: seeded split, {len(train_records)} train / {len(val_records)} val "
                     f"images{kept}")
    notes.append(mode_note(opts))
    notes += _overlap(train_records, val_records, digests)
    total = train.total + (val.total if val else 0)
    skip = summary(problems, max(total, len(problems))) if problems else ""
    return RunData(train_records, val_records, notes, [str(p) for p in problems], skip)
