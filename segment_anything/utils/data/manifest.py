"""The manifest of checked samples: a later start re-checks only the files that changed.

Checking a sample decodes its image and masks (checks.run_checks); on a large set that is most
of the start-up, and a resume, a requeue or a new run on the same data would repeat it. The
manifest keeps each good sample's result (its Record, dropped objects and pixel digest) with the
size and modification time of every file it was built from; a sample is taken from it only when
its candidate (what the format listed: paths, annotations), the format, the folder and the data
options are the same and none of its files changed size or time. Bad samples are never stored,
so every bad file is checked again and named on every start.

One file per split and options under ``$XDG_CACHE_HOME/sam_finetune/checks/``, written
atomically; an unreadable or foreign file is ignored (everything is checked). It is read with an
unpickler that builds only this package's records and plain containers.
"""

import contextlib
import gc
import hashlib
import io
import os
import dataclasses
import pickle
import stat
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .cache import default_cache_dir

VERSION = 2  # 2: pixel digests by SHA-256
RACY_NS = 2_000_000_000  # files changed this recently are checked again next time
Stamp = Tuple[str, int, int]  # path, size, mtime_ns


def manifest_dir() -> Path:
    return default_cache_dir().parent / "checks"


def _files(obj) -> Iterable[str]:
    """Path-like values among a candidate's or a record's fields (one level into tuples); a
    record's category names are not files."""
    if not hasattr(obj, "__dataclass_fields__"):
        values = [obj]
    else:
        values = [getattr(obj, f) for f in obj.__dataclass_fields__ if f != "categories"]
    for value in values:
        if isinstance(value, (str, Path)):
            items = (value,)
        elif isinstance(value, (tuple, list)) and value and isinstance(value[0], (str, Path)):
            items = value  # a tuple of numbers (a size, object labels) is passed over at its first item
        else:
            continue
        for item in items:
            if isinstance(item, (str, Path)) and item and len(str(item)) < 4096:
                yield str(item)


def stamps(*objects) -> Optional[List[Stamp]]:
    """(path, size, mtime_ns) of every regular file named by the objects; None if there is none."""
    found, seen = [], set()
    for obj in objects:
        for path in _files(obj):
            if path in seen:
                continue
            seen.add(path)
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((path, st.st_size, st.st_mtime_ns))
    return found or None


def unchanged(saved: List[Stamp]) -> bool:
    for path, size, mtime in saved:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off while many objects that hold no cycles are built: a
    manifest of 10k samples loaded in 0.26 s with it running and 0.05 s without."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Unpickler(pickle.Unpickler):
    """Only classes of this project's utils (records, specs) and plain containers: a manifest
    cannot call a function."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("collections", "Counter"), ("pathlib", "PosixPath")):
            return super().find_class(module, name)
        if module.startswith("segment_anything.utils.") and "." not in name:
            found = super().find_class(module, name)
            # A dataclass defined there (not a name it imports): building one sets fields and checks them.
            if isinstance(found, type) and dataclasses.is_dataclass(found) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a manifest")


class Manifest:
    """Checked results of one split, by candidate key."""

    def __init__(self, path: Optional[Path], context: str) -> None:
        self.path, self.context = path, context
        self.entries: Dict[str, Tuple[List[Stamp], object]] = {}
        self.changed = False
        self._keys: Dict[object, str] = {}
        if path is not None and path.is_file():
            try:
                with open(path, "rb") as f, gc_paused():
                    version, entries = _Unpickler(io.BufferedReader(f)).load()
                if version == VERSION and isinstance(entries, dict):
                    self.entries = entries
            except Exception:  # damaged, foreign, from another version: check everything
                self.entries = {}

    @classmethod
    def open(cls, fmt: str, source: str, opts, images: Optional[str] = None) -> "Manifest":
        context = repr((VERSION, fmt, str(Path(source).absolute()), str(images), opts))
        name = hashlib.blake2b(context.encode(), digest_size=16).hexdigest()
        return cls(manifest_dir() / f"{name}.pkl", context)

    def key(self, candidate) -> str:
        try:  # get, put and keep_only each ask for a candidate's key: computed once
            return self._keys[candidate]
        except KeyError:
            key = self._keys[candidate] = hashlib.blake2b(repr(candidate).encode(), digest_size=16).hexdigest()
            return key
        except TypeError:  # a candidate holding a list (COCO annotations) is not hashable
            return hashlib.blake2b(repr(candidate).encode(), digest_size=16).hexdigest()

    def get(self, candidate):
        """The stored result when no file of the candidate changed, else None."""
        hit = self.entries.get(self.key(candidate))
        if hit is not None and unchanged(hit[0]):
            return hit[1]
        return None

    def put(self, candidate, result) -> None:
        """Store a good result, unless a file is too new to trust its time: a file changed again
        within the file system's time resolution would keep its size and time (as git treats
        "racily clean" files)."""
        files = stamps(candidate, getattr(result, "record", result))  # a stack (planes.StackBuilt) names its image
        if files is None:  # nothing on disk to watch: always checked
            return
        recent = time.time_ns() - RACY_NS
        if all(mtime < recent for _, _, mtime in files):
            self.entries[self.key(candidate)] = (files, result)
            self.changed = True

    def keep_only(self, candidates) -> None:
        """Drop entries of samples no longer listed (removed files), so the file does not grow."""
        keys = {self.key(c) for c in candidates}
        if self.entries.keys() - keys:
            self.entries = {k: v for k, v in self.entries.items() if k in keys}
            self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                pickle.dump((VERSION, self.entries), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.path)
            tmp = None
        except OSError:  # a read-only or full cache folder: the next start checks everything again
            pass
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self.changed = False

