"""Fine-tune SAM's mask decoder on your images and masks, on one process or many (`run.py`, `sam-train`).

    torchrun --nproc_per_node 8 run.py --batch_size 8 --model_type vit_h --checkpoint sam_vit_h_4b8939.pth --train_dir data/train
    python run.py --batch_size 8 --dist True ...        # spawns one worker per visible GPU itself
    python run.py --world_size 2 --checkpoint none ...  # no GPU: 2 CPU processes on gloo

Flags: python run.py --help. The run folder gets best.pth (only the trained parameters, loadable
into stock SAM), last.pth (resume state), metrics.jsonl, args.json and train.log.
"""

import gc
import os
import signal
import sys
from typing import Optional

import torch
import torch.multiprocessing as mp

from segment_anything.training.config import TrainConfig
from segment_anything.utils.distributed import destroy_distributed, init_distributed, launched_by_torchrun, pick_device
from segment_anything.training.engine import fit
from segment_anything.training.preflight import PREFLIGHT_ERRORS, PreflightError, Prepared, preflight, share_preflight
from segment_anything.utils.log import get_logger, setup_logging
from segment_anything.training.launch import default_threads, die_with_parent, discard_unstarted_run, pick_port


def worker(rank: int, cfg: TrainConfig, device_type: str, world_size: int, init_method: Optional[str],
           prepared: Optional[Prepared]) -> None:
    if init_method is not None or launched_by_torchrun():
        die_with_parent()  # a worker never outlives the launcher that started it
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    setup_logging(rank)
    # CPU processes share the cores with each other and with other programs.
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        threads, note = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        torch.set_num_threads(threads)
        if rank == 0:
            get_logger().info(note)
    info = init_distributed(device_type, rank, local_rank, world_size, init_method, cfg.dist_timeout)
    try:
        prepared = share_preflight(cfg, info, prepared)
        out_dir = prepared.out_dir
        existed = out_dir.exists()
        try:
            fit(cfg, info, prepared)
        except BaseException:
            if info.is_main and discard_unstarted_run(out_dir, existed):
                get_logger().error(f"the run failed before its first save; removed what it wrote in {out_dir}")
            raise
    except PreflightError as err:  # under torchrun the checks run here, on rank 0, for all ranks
        sys.exit(f"error (rank {rank}): {err}")
    finally:
        # Free the DDP wrapper and its gradient buckets before the group goes: torch can
        # abort at exit when they outlive it.
        gc.collect()
        destroy_distributed()


def main(argv=None) -> None:
    cfg = TrainConfig.from_args(argv)
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
        prepared = preflight(cfg)
    except PREFLIGHT_ERRORS as err:
        sys.exit(f"error: {err}")
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


if __name__ == "__main__":
    main()
