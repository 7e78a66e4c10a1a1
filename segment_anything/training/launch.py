"""Worker processes: die with the launcher, a free or checked port, threads per process, no orphan
run folders, and the command that resumes a run the way it was launched."""

import ctypes
import errno
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..utils.distributed import launched_by_torchrun

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCH_SECONDS = 1.0
_GRACE_SECONDS = 30.0  # to save last.pth and leave the process group after the parent died


def die_with_parent() -> None:
    """End this process when its parent (the run.py launcher or torchrun's agent) dies.

    Without this, killing only the launcher of a spawned run can leave its workers training and
    writing into the run folder: torch's spawn asks Linux for SIGINT at the parent's death, which a
    process started in the background by a script (`python run.py ... &`, nohup) ignores. Here the
    signal is SIGTERM, which nothing ignores by default and which lets a SIGTERM handler save and
    leave the process group as it does when a scheduler stops the run; elsewhere, or if prctl is
    unavailable, a daemon thread notices that the parent pid changed. Either way the thread sends
    SIGKILL if the process is still alive _GRACE_SECONDS later.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is re-parented to init or a subreaper
        time.sleep(_WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_port(port: Optional[int]) -> int:
    """The port for a self-spawned process group: --port if it is free, a free one if --port was not given.

    Raises ValueError (one line naming --port) when --port is taken, instead of the worker's EADDRINUSE traceback.
    """
    if port is None:
        return free_port()
    with socket.socket() as s:
        # SO_REUSEADDR as the process group's store sets it: a port in TIME_WAIT is usable, a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise ValueError(f"--port {port} is in use on 127.0.0.1 (another run?); pass another --port, "
                             "or leave --port out to use a free one") from None
    return port


def default_threads(local_processes: int) -> Tuple[int, str]:
    """CPU threads per process when --threads is not given, and a log line saying why.

    The cores this process may use (its affinity mask: taskset, cgroups, a scheduler's
    allocation) less those other programs keep busy (the 1-minute load average, rounded), shared
    by this node's processes; at least 1. More threads than free cores make every thread wait for
    the others at each parallel region: on a busy machine that is many times slower than one thread.
    OMP_NUM_THREADS, when set, is taken as it is: the count then does not change between a run and
    its resumption (float sums split over another number of threads round differently).
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:  # an explicit choice, and the same on every start: a resumed run
        return int(omp), f"CPU threads per process: {omp} (OMP_NUM_THREADS; --threads N sets it)"  # reproduces bit for bit
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(cores - int(load + 0.5), 1)
    threads = max(1, free // max(local_processes, 1))
    note = (f"CPU threads per process: {threads} ({cores} usable cores, 1-minute load average {load:.1f}, "
            f"{local_processes} process(es) on this node; --threads N sets it)")
    return threads, note


def discard_unstarted_run(out_dir: Path, existed: bool) -> bool:
    """Undo the run folder of a run that failed before saving anything to resume from.

    Such a folder would block reusing --output_dir, and --resume of it fails (no last.pth).
    existed: the folder was there (empty) before the run; then only its contents go.
    Returns True if something was removed.
    """
    if not out_dir.is_dir() or (out_dir / "last.pth").exists() or (out_dir / "best.pth").exists():
        return False
    if not existed:
        shutil.rmtree(out_dir, ignore_errors=True)
        return True
    for child in list(out_dir.iterdir()):
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    return True


def launch_cmdline() -> List[str]:
    """The command line the user typed to start this run: torchrun's (this worker's parent) under
    torchrun, the run.py launcher's (the parent) in a worker it spawned, else this process's own."""
    if launched_by_torchrun() or multiprocessing.parent_process() is not None:
        try:
            return [a.decode(errors="replace") for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:  # not Linux: the fallback below
            return []
    return list(getattr(sys, "orig_argv", []))


def resume_command(out_dir, cmdline: Optional[Sequence[str]] = None, argv0: Optional[str] = None) -> str:
    """The command that continues out_dir the way this run was started: the launch command up to
    the training script (torchrun and its flags included: the world size must match), then
    --resume out_dir, which takes the run's saved flags. 'python run.py --resume out_dir' when
    the command line cannot be read."""
    cmd = list(launch_cmdline() if cmdline is None else cmdline)
    script = sys.argv[0] if argv0 is None else argv0
    prefix: List[str] = []
    if script in cmd[1:]:  # python run.py, torchrun ... run.py, a console script
        prefix = cmd[:cmd.index(script, 1) + 1]
    elif "-m" in cmd[1:-1]:  # python -m segment_anything.tools.train
        prefix = cmd[:cmd.index("-m", 1) + 2]
    if len(prefix) >= 2 and not prefix[1].startswith("-") and not prefix[1].endswith(".py"):
        prefix = [os.path.basename(prefix[1])] + prefix[2:]  # a console script (torchrun, sam-train) by its name
    if not prefix:
        prefix = ["python", "run.py"]
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)
    text = shlex.join(prefix + ["--resume", str(out_dir)])
    return text + (f" (on each of the {nodes} nodes, with its own torchrun flags)" if nodes > 1 else "")


def check_writable_folder(folder: Path, flag: str) -> None:
    """ValueError naming flag when the run folder cannot be created or written: a path through a
    file, a read-only or special file system (/sys), no permission. Tried for real (a probe folder
    made and removed), since permission bits say nothing for root or on network file systems."""
    folder = Path(folder)
    name = f"{flag} {folder}"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}: it is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}: cannot create it: {existing} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".sam-write-check-", dir=existing)).rmdir()
    except OSError as err:
        where = "cannot write in it" if existing == folder else f"cannot create it in {existing}"
        raise ValueError(f"{name}: {where} ({err.strerror or err})") from None
