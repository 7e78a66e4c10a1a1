"""--plane all: every plane of a stack is a training item of its own, a Record per (file, plane).

Z-stacks and time series hold many images in one file. With --plane all each candidate a format
lists is checked as a stack: its image's planes are counted (stacks.py numbers them over every
plane axis in file order) and the format builds one record per plane, with the plane in its
ImageSpec, so the record reads that plane, names it in every message ('stack.tif plane 5 (T=1,
Z=1): ...') and keys the embedding cache with it. A 2-D image in the same folder is one record, as
without the flag.

Labels: a label file that is itself a stack gives the matching plane and must have as many planes
as its image (else one line naming both files); a single 2-D label serves every plane of its
image. A plane without an object is left out and counted (the top and bottom of a z-stack are
often empty); a stack without an object in any plane is a bad sample.

The seeded validation split (prepare.split_records) draws whole files, so all planes of a stack
are on the same side: neighbouring planes are nearly the same image, and one in each split would
score the model on what it trained on.
"""

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

from .checks import BadSample
from .image_io import kept_decoded, label_planes, plane_layout
from .stacks import plane_name


@dataclass
class StackBuilt:
    """The checked planes of one stack (formats.Built each) and how many were left out empty.
    image: the stack's file (a field the manifest watches for changes)."""

    image: str
    planes: list
    count: int  # planes in the file
    empty: int  # planes without an object, left out


@dataclass
class StackCounts:
    """What --plane all made of one split, for the start-up log."""

    stacks: int = 0
    planes: int = 0  # kept
    empty: int = 0
    flat: int = 0  # 2-D images

    def line(self) -> str:
        text = f"--plane all: {self.stacks} stack(s) -> {self.planes} planes"
        if self.empty:
            text += f" ({self.empty} without objects left out)"
        return text + f", and {self.flat} 2-D image(s); each plane is an image of its own"


def stack_builder(files: Callable, build_with: Callable, opts) -> Callable:
    """The build of one candidate with --plane all: a formats.Built for a 2-D image, a StackBuilt
    for a stack. files(candidate) -> (image path or None, label paths); build_with(candidate,
    opts) -> Built, the format's own build."""

    def build(candidate):
        image, labels = files(candidate)
        with kept_decoded():
            count = plane_layout(image, opts.image_spec).count if image is not None else 1
            check_labels(image, count, labels)
            if count == 1:
                return build_with(candidate, opts)
            built, empty = [], 0
            for k in range(count):
                spec = replace(opts.image_spec, plane=k)
                try:
                    built.append(build_with(candidate, replace(opts, image_spec=spec)))
                except BadSample as err:
                    if err.kind != "no objects":
                        raise named(err, str(image), k) from None
                    empty += 1
        if not built:
            raise BadSample("no objects", f"{image}: no objects in any of its {count} planes")
        return StackBuilt(str(image), built, count, empty)

    return build


def named(err: BadSample, image: str, plane: int) -> BadSample:
    """err with the plane named first, unless it names it already (the image's own messages do)."""
    if f"plane {plane}" in str(err):
        return err
    return BadSample(err.kind, f"{plane_name(image, plane)}: {err}")


def check_labels(image: Optional[str], count: int, labels: Sequence[str]) -> None:
    """A label stack has the planes of its image; a 2-D label (one plane) serves them all."""
    for label in labels:
        found = label_planes(label).count
        if found > 1 and found != count:
            what = f"{count} planes" if count > 1 else "one plane (a 2-D image)"
            raise BadSample("plane count", f"{image} has {what}, its label stack {label} has {found}: give one label "
                                           "plane per image plane, or one 2-D label for every plane")


def flatten(results: Sequence, counts: StackCounts) -> List:
    """Built results of a split with each StackBuilt replaced by its planes, counted."""
    out = []
    for result in results:
        if isinstance(result, StackBuilt):
            counts.stacks += 1
            counts.planes += len(result.planes)
            counts.empty += result.empty
            out.extend(result.planes)
        else:
            counts.flat += 1
            out.append(result)
    return out
