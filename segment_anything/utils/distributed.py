"""The one place that touches torch.distributed: start, stop, rank helpers and reductions.

Every helper also works with no process group (a single process), so the training code has
one path for 1 and N processes.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def torchrun_restarts() -> Tuple[int, int]:
    """(how many times torchrun has restarted this node's workers, its --max_restarts); (0, 0)
    outside torchrun. The count is per node: a node whose agent restarted its workers because
    another node failed may count 0 (a membership change costs no restart)."""
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0))


def pick_device(name: str = "auto") -> str:
    """'auto' -> cuda if available, then mps, then cpu; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps was asked for but MPS is not available")
    return name


def init_distributed(
    device_type: str, rank: int, local_rank: int, world_size: int, init_method: Optional[str] = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Join the process group (when world_size > 1) and bind this process to its device.

    NCCL on CUDA, gloo otherwise. init_method None means env:// (torchrun's MASTER_ADDR/PORT).
    timeout_s: how long a collective waits for a rank that died or hangs before it fails.
    More processes on a node than GPUs (a test of the multi-process path on one GPU) share the
    GPUs round robin over gloo, which takes CUDA tensors: NCCL refuses two ranks on one device.
    """
    backend = "gloo"
    if device_type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        backend = "nccl" if local_world <= torch.cuda.device_count() else "gloo"
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device(device_type)
    if world_size > 1:
        # NCCL only honours the timeout with asynchronous error handling (a hung collective
        # otherwise blocks forever); 1 = abort the communicator and raise.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if device_type == "mps":
            raise RuntimeError("several processes on one Apple GPU are not supported; use --world_size 1")
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if backend == "nccl" else {}),
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    global _PATIENT
    if is_dist():
        dist.destroy_process_group()
    _PATIENT = None


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place and returned (a no-op with one process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def share_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) on every rank, in place. DDP copies
    them before each forward, but a training forward then updates each rank's copy with its own
    batch: without this, the ranks would validate slightly different models, and only rank 0 the
    one best.pth holds."""
    if is_dist():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


LONG_WAIT_S = 7 * 24 * 3600.0


def broadcast_object(obj: Any, src: int = 0, patient: bool = False) -> Any:
    """Rank src's obj on every rank (picklable objects).

    patient: the other ranks wait as long as rank src takes (the data checks before training,
    minutes on a large set), not the default group's timeout, which is there to stop a run whose
    rank died or hangs mid-training. The wait goes through a gloo group of its own with a long
    timeout; a rank that dies still ends the wait, as its launcher (torchrun) ends the group."""
    if not is_dist():
        return obj
    holder = [obj]
    group = _patient_group() if patient else None
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


_PATIENT = None


def _patient_group():
    global _PATIENT
    if _PATIENT is None:
        _PATIENT = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=LONG_WAIT_S))
    return _PATIENT


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's obj, indexed by rank."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
