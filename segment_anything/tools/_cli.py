"""How every tool ends: one line on bad input or Ctrl-C, never a traceback."""

import errno
import signal
import sys
from typing import Callable

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
