"""Starting a run: the launcher checks everything once (preflight), then runs one worker or spawns
one per process; each worker dies with the launcher, takes a free or checked port and its share of
the CPU threads, and a run that fails before its first save leaves no run folder behind."""

import ctypes
import errno
import gc
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.multiprocessing as mp

from ..utils.distributed import destroy_distributed, init_distributed, launched_by_torchrun, pick_device
from ..utils.log import get_logger, setup_logging
from ..utils.process import keep_freed_memory, skip_collection_at_exit
from .config import TrainConfig
from .engine import fit
from .preflight import PREFLIGHT_ERRORS, PreflightError, Prepared, preflight, share_preflight
from .resume import resume_command

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


def worker(rank: int, cfg: TrainConfig, device_type: str, world_size: int, init_method: Optional[str],
           prepared: Optional[Prepared]) -> None:
    if init_method is not None or launched_by_torchrun():
        die_with_parent()  # a worker never outlives the launcher that started it
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    setup_logging(rank)
    keep_freed_memory()
    skip_collection_at_exit()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored in a script's background job: stays so
        signal.signal(signal.SIGINT, interrupt_once)  # the training steps install their own (faults.stop_signals)
    # CPU processes share the cores with each other and with other programs.
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        threads, note = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        torch.set_num_threads(threads)
        if rank == 0:
            get_logger().info(note)
    out_dir: Optional[Path] = None
    try:
        info = init_distributed(device_type, rank, local_rank, world_size, init_method, cfg.dist_timeout)
        prepared = share_preflight(cfg, info, prepared)
        out_dir = prepared.out_dir
        existed = out_dir.exists()
        try:
            fit(cfg, info, prepared)
        except BaseException:
            if info.is_main and discard_unstarted_run(out_dir, existed):
                get_logger().error(f"the run stopped before its first save; removed what it wrote in {out_dir}")
            raise
    except PreflightError as err:  # under torchrun the checks run here, on rank 0, for all ranks
        sys.exit(f"error (rank {rank}): {err}")
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (those stop after a step and save)
        if rank == 0:
            get_logger().warning(interrupted_message(out_dir))
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        # Free the DDP wrapper and its gradient buckets before the group goes: torch can
        # abort at exit when they outlive it.
        gc.collect()
        destroy_distributed()


def interrupt_once(signum, frame) -> None:
    """Ctrl-C outside the training steps: stop now. A worker gets the same SIGINT from its process
    group and from its launcher; the repeat must not interrupt the clean-up of the first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def interrupted_message(out_dir: Optional[Path]) -> str:
    """One line for a Ctrl-C before training started (or after it ended): what is kept, how to go on."""
    if out_dir is not None and (out_dir / "last.pth").is_file():
        return (f"interrupted (SIGINT) outside the training steps; {out_dir / 'last.pth'} is unchanged. "
                f"To continue: {resume_command(out_dir)}")
    return "interrupted (SIGINT) before the first save; nothing to resume"


def launch(cfg: TrainConfig) -> None:
    """Run cfg: under torchrun this process is one worker; else one worker here, or --world_size
    (default: the visible GPUs) spawned ones."""
    skip_collection_at_exit()
    device_type = pick_device(cfg.device)
    if launched_by_torchrun():
        worker(int(os.environ["RANK"]), cfg, device_type, int(os.environ["WORLD_SIZE"]), None, None)
        return
    if cfg.dist:
        default = torch.cuda.device_count() if device_type == "cuda" else 1
        world_size = cfg.world_size or default
    else:
        world_size = 1
    # Every check runs here, before any process starts: a bad file is one clear error.
    # The workers get the result, so they all use the same (timestamped) run folder.
    try:
        port = pick_port(cfg.port) if world_size > 1 else None
        prepared = preflight(cfg, world_size)
    except PREFLIGHT_ERRORS as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("interrupted (SIGINT) during the checks before training; nothing was started", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    if world_size == 1:
        worker(0, cfg, device_type, 1, None, prepared)
        return
    out_dir = prepared.out_dir
    existed = out_dir.exists()
    try:
        spawn_workers(world_size, (cfg, device_type, world_size, f"tcp://127.0.0.1:{port}", prepared))
    except BaseException:
        discard_unstarted_run(out_dir, existed)  # a worker killed by a signal cannot clean up itself
        raise


def spawn_workers(world_size: int, args: tuple) -> None:
    """Start the workers and wait. SIGINT/SIGTERM to this launcher go to every worker, which saves
    last.pth and stops; a worker that fails ends the others (torch's clean-up) and this launcher
    with its exit code, without a second traceback (the worker's log says what happened)."""
    context = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        sys.exit(err.exit_code if err.exit_code and err.exit_code > 0 else 1)
    except mp.ProcessRaisedException as err:
        sys.exit(f"error: a worker failed:\n{err}")
