"""Bad input, found before training: one problem per file, all reported at once.

Every format turns each candidate sample into a Record or a `BadSample`. `check_all` runs that on
every candidate (threads: decoders release the GIL) and either raises one DataError listing every
problem, or, with `skip_bad`, leaves the bad samples out and returns them for the summary and
`<run>/skipped.txt`.
"""

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple, TypeVar

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


def run_checks(candidates: Sequence[T], build: Callable[[T], R],
               workers: int = 0) -> Tuple[List[R], List[Problem]]:
    """build(candidate) for every candidate, in threads; (results in order, problems)."""
    workers = workers or min(8, os.cpu_count() or 1)

    def one(candidate):
        try:
            return build(candidate)
        except BadSample as err:
            return Problem(err.kind, str(err))
        except DataError as err:
            return Problem("bad file", str(err))
        except (ValueError, TypeError, KeyError, IndexError, OSError) as err:
            # Malformed content the format did not foresee (a point that is not a number, a
            # missing key): still one named sample, not a crash in a checking thread.
            return Problem("bad file", f"{_name(candidate)}: cannot use it ({type(err).__name__}: {err})")

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, candidates))
    good = [r for r in results if not isinstance(r, Problem)]
    return good, [r for r in results if isinstance(r, Problem)]


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
                    + "\n--skip_bad leaves them out and trains on the rest")
