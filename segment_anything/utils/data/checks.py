"""Bad input, found before training: one problem per file, all reported at once.

Every format turns each candidate sample into a Record or a `BadSample`. `run_checks` runs that on
every candidate not in the manifest of earlier checks (manifest.py), in forked processes when
there are many, and the caller either raises one DataError listing every problem, or, with
`skip_bad`, leaves the bad samples out and lists them in the summary and `<run>/skipped.txt`.
"""

import contextlib
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import cv2

SHOWN = 20  # problems printed in an error message; the rest are counted

T = TypeVar("T")
R = TypeVar("R")


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it."""


class BadSample(DataError):
    """One sample that cannot be used. kind is a short word for the summary ("unreadable")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Problem:
    kind: str  # e.g. "unreadable", "size mismatch", "no objects"
    message: str  # names the file

    def __str__(self) -> str:
        return self.message


def run_checks(candidates: Sequence[T], build: Callable[[T], R], workers: int = 0,
               manifest=None) -> Tuple[List[R], List[Problem]]:
    """build(candidate) for every candidate; (results in order, problems).

    manifest (manifest.Manifest): results of earlier checks, taken for candidates whose files
    did not change; the others are built (in processes when there are many) and stored."""
    results: List = [None] * len(candidates)
    todo = []
    for i, candidate in enumerate(candidates):
        hit = manifest.get(candidate) if manifest is not None else None
        if hit is None:
            todo.append(i)
        else:
            results[i] = hit
    # Stored as they come, while the checking processes work on the next ones.
    for k, result in enumerate(_build_all([candidates[i] for i in todo], build, workers)):
        i = todo[k]
        results[i] = result
        if manifest is not None and not isinstance(result, Problem):
            manifest.put(candidates[i], result)
    if manifest is not None:
        manifest.keep_only(candidates)
        manifest.save()
    good = [r for r in results if not isinstance(r, Problem)]
    return good, [r for r in results if isinstance(r, Problem)]


# What a forked checking process checks: the build function and the candidates, inherited from
# the parent at fork, so that a task is two numbers and not pickled candidates.
_BUILD: Optional[Callable] = None
_ITEMS: Sequence = ()


def _check_range(bounds: Tuple[int, int]) -> List:
    return [_check_one(candidate) for candidate in _ITEMS[bounds[0]:bounds[1]]]


def _check_one(candidate, build=None):
    try:
        return (build or _BUILD)(candidate)
    except BadSample as err:
        return Problem(err.kind, str(err))
    except DataError as err:
        return Problem("bad file", str(err))
    except (ValueError, TypeError, KeyError, IndexError, OSError) as err:
        # Malformed content the format did not foresee (a point that is not a number, a
        # missing key): still one named sample, not a crash in a checking thread.
        return Problem("bad file", f"{_name(candidate)}: cannot use it ({type(err).__name__}: {err})")


def _build_all(items: Sequence, build: Callable, workers: int) -> Iterator:
    """Results in order, as they come. Many items: forked processes (decoding holds the GIL for
    part of the work, so threads do not scale), each decoding every file once, with a progress
    line; few items, or no fork: threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = workers or cores
    progress = Progress(len(items))
    with opencv_single_threaded():
        yield from _run(items, build, workers, progress)
    progress.done()


PROCESS_MIN = 200  # fewer samples: threads (a process pool costs more than it saves)
TASKS_PER_WORKER = 16  # tasks of consecutive samples: few, as each costs the parent ~0.4 ms; enough
CHUNK_MAX = 128  # that no process waits long for another's last one


def _run(items: Sequence, build: Callable, workers: int, progress: "Progress") -> Iterator:
    global _BUILD, _ITEMS
    if len(items) >= PROCESS_MIN and workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        _BUILD, _ITEMS = build, items
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                chunk = max(1, min(CHUNK_MAX, len(items) // (workers * TASKS_PER_WORKER)))
                bounds = [(i, min(i + chunk, len(items))) for i in range(0, len(items), chunk)]
                for done in pool.imap(_check_range, bounds):
                    progress.step(len(done))
                    yield from done
        finally:
            _BUILD, _ITEMS = None, ()
    else:
        with ThreadPoolExecutor(min(workers, 8)) as pool:
            for result in pool.map(lambda c: _check_one(c, build), items):
                progress.step()
                yield result


@contextlib.contextmanager
def opencv_single_threaded():
    """OpenCV's own threads off while checking: every checking process or thread already has a
    core, and OpenCV's idle threads spin after each parallel call (a colour conversion, the
    connected components) on the cores the other checkers need. One thread each halved the
    CPU time of checking a small image and its mask in one process (docs/distributed.md)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


class Progress:
    """'checking data: 12,000/100,000 (2,310/s, 34 s left)' on stderr every PROGRESS_S seconds
    (in place on a terminal), for checks that take long enough to wonder about."""

    PROGRESS_S = 2.0

    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0
        self.start = self.last = time.monotonic()
        self.shown = False
        self.tty = sys.stderr.isatty()

    def step(self, count: int = 1) -> None:
        self.count += count
        now = time.monotonic()
        if now - self.last >= self.PROGRESS_S:
            self.last = now
            self.show(now)

    def show(self, now: float) -> None:
        rate = self.count / max(now - self.start, 1e-9)
        left = (self.total - self.count) / rate if rate > 0 else float("inf")
        line = f"checking data: {self.count:,}/{self.total:,} ({rate:,.0f}/s, {left:,.0f} s left)"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            now = time.monotonic()
            sys.stderr.write(("\r" if self.tty else "") + f"checking data: {self.count:,} samples in "
                             f"{now - self.start:,.1f} s\n")
            sys.stderr.flush()


def _name(candidate) -> str:
    """The file(s) a candidate stands for: a path, or the paths among its fields."""
    fields = getattr(candidate, "__dataclass_fields__", None)
    if fields:
        return ", ".join(str(getattr(candidate, f)) for f in fields if "path" in f or f in ("image", "mask", "folder", "json"))
    return str(candidate)


def summary(problems: Sequence[Problem], total: int) -> str:
    """'skipped 3 of 412 images: 2 unreadable, 1 size mismatch'."""
    counts = Counter(p.kind for p in problems)
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    return f"skipped {len(problems)} of {total} images: {kinds}"


def raise_problems(problems: Sequence[Problem], what: str) -> None:
    """One DataError listing every problem (the first SHOWN), with the --skip_bad hint."""
    if not problems:
        return
    lines = [str(p) for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"(and {len(problems) - SHOWN} more)")
    raise DataError(f"{what}: {len(problems)} bad sample(s):\n  " + "\n  ".join(lines)
                    + "\n--skip_bad leaves them out and goes on with the rest")
