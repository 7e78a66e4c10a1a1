"""torchrun without a traceback on Ctrl-C: `python -m segment_anything.tools.torchrun [torchrun flags] run.py [flags]`.

torchrun's agent answers SIGINT/SIGTERM by passing the signal on to the workers (which save
last.pth and print how to resume) and then raising SignalException, whose traceback buries that
message. This runs torchrun's own main with its flags unchanged and ends with 128 + the signal's
number instead, as a process killed by it would. A worker that fails makes torchrun report the
failed ranks; that report ends in one line here too (the workers' own logs say what went wrong).
The launch/ scripts start runs through it.
"""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, main as torchrun_main

NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")  # what torchrun takes besides a count


def check(argv) -> None:
    """The process count and restarts, in one line each, before torchrun starts anything (torchrun
    itself ends a bad one with a traceback, one of them without a message)."""
    args = get_args_parser().parse_args(argv)
    nproc = str(args.nproc_per_node)
    if not (nproc in NPROC_WORDS or (nproc.isdigit() and int(nproc) >= 1)):
        sys.exit(f"error: --nproc_per_node (NPROC in launch/*.sh) must be a whole number >= 1 or one of "
                 f"{', '.join(NPROC_WORDS)}, got {nproc!r}")
    if args.max_restarts < 0:
        sys.exit(f"error: --max_restarts (MAX_RESTARTS in launch/*.sh) must be >= 0, got {args.max_restarts}")


def main(argv=None) -> None:
    check(sys.argv[1:] if argv is None else argv)
    try:
        torchrun_main(argv)
    except SignalException as err:
        sys.exit(128 + int(err.sigval))
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        codes = ", ".join(f"rank {r} exit code {f.exitcode}" for r, f in sorted(err.failures.items()))
        print(f"error: {err.name} failed on this node ({codes}); the workers' messages above say why", file=sys.stderr)
        code = failure.exitcode  # negative: killed by that signal
        sys.exit(128 - code if code < 0 else code if 0 < code < 256 else 1)


if __name__ == "__main__":
    main()
