"""How every tool ends: one line on bad input or Ctrl-C, never a traceback."""

import contextlib
import errno
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..utils.process import skip_collection_at_exit


def cli(main: Callable[[], None]) -> None:
    """Run a tool's main(); input errors (bad flags, files, prompts, weights for another model),
    paths that cannot be read or written, and Ctrl-C end the program with one line instead of a
    traceback."""
    skip_collection_at_exit()
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a path that cannot be written or read (a file where a folder should be, permissions)
        what = err.strerror or str(err)
        if err.errno in (errno.EEXIST, errno.ENOTDIR):
            what = "a file is in the way: a folder is needed there (give another output path)"
        sys.exit(f"error: {err.filename}: {what}" if err.filename else f"error: {what}")
    except KeyboardInterrupt:  # Ctrl-C: the exit code of SIGINT, no traceback
        print("interrupted (SIGINT)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def at_least(args, **minimums: int) -> None:
    """ValueError naming the first of the flags (attribute=minimum) whose value is below its
    minimum: the tools' one rule for counts and sizes."""
    for flag, low in minimums.items():
        value = getattr(args, flag)
        if value < low:
            raise ValueError(f"--{flag} must be >= {low}, got {value}")


@contextlib.contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """Make a tool's output folder (and its parents); when the tool stops on bad input before it
    wrote anything there, the folders it made go again, so a failed command leaves nothing."""
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only an empty one
            except OSError:
                break
        raise
