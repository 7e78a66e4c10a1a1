"""Faults during training: non-finite steps, stop signals, periodic saves and lost ranks.

StepGuard sits between backward() and the optimizer step. Once per step every rank contributes
three flags to one all_reduce: "my loss or gradient is not finite", "a save is due" (rank 0's
clock) and "I got SIGINT/SIGTERM". Every rank then takes the same decision, so ranks never
diverge: all skip the step, all save last.pth, all stop.

A rank that dies or hangs makes the others' next collective fail (at once for a dead peer, after
--dist_timeout for a hung one). lost_rank_message() then names the rank from the step counters
every rank writes into the process group's store before its all_reduce.
"""

import errno
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..utils.distributed import DistInfo, all_reduce_sum, is_dist
from ..utils.log import get_logger
from ..utils.save_weight import WriteError, load_data_only
from .resume import resume_command

# TEST-ONLY fault injection, read here and nowhere else: comma-separated "KIND:RANK:STEP", KIND
# nan (this rank's gradients become NaN at that global step; "STEP+" = from that step on), exit
# (the rank dies), hang (the rank stops responding) or sigint (STEP -1 only: the rank sends SIGINT
# to its process group while starting up, as Ctrl-C would). Never set it for real training.
TEST_FAULT_ENV = "SAM_TEST_FAULT"
PROGRESS_KEY = "sam_finetune/progress/{}"


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (signal, too many bad steps); last.pth is saved."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _test_fault(rank: int, step: int) -> Optional[str]:
    for spec in filter(None, os.environ.get(TEST_FAULT_ENV, "").split(",")):
        kind, fault_rank, at = spec.split(":")
        hit = step >= int(at[:-1]) if at.endswith("+") else step == int(at)
        if hit and int(fault_rank) == rank:
            return kind
    return None


def startup_test_fault(rank: int) -> None:
    """The sigint fault of TEST_FAULT_ENV: a Ctrl-C while this rank is still starting up."""
    if _test_fault(rank, -1) == "sigint":
        os.killpg(os.getpgid(0), signal.SIGINT)
        time.sleep(5)  # the KeyboardInterrupt comes meanwhile


def _finite(loss: torch.Tensor, optimizer: torch.optim.Optimizer, check_grads: bool) -> torch.Tensor:
    """0-dim bool tensor, no host sync: loss and (optionally) every gradient finite."""
    ok = torch.isfinite(loss.detach()).all()
    if check_grads:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            # A norm is inf/NaN when any element is; one fused kernel over all tensors.
            ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    return ok


class StepGuard:
    """One per run. check() before the optimizer step, end_step() after it.

    run: engine.Training (its step counters change through its checked_step() and end_step()).
    save: writes last.pth; called on every rank at the same step (it gathers RNG states).
    """

    def __init__(self, run, info: DistInfo, save: Callable[[Optional[torch.Tensor]], None], resume_hint: str) -> None:
        self.run, self.info, self.save, self.resume_hint = run, info, save, resume_hint
        self.cfg = run.cfg
        self.signal_name: Optional[str] = None
        self.last_save, self.steps_since_save = time.monotonic(), 0
        self._save_now = self._stop_now = False
        self.resumed_sums: Optional[torch.Tensor] = None  # the interrupted epoch's meter sums
        self.on_step: Optional[Callable] = None  # (global step, terms, lr) after every finite step

    def take_resumed_sums(self) -> Optional[torch.Tensor]:
        sums, self.resumed_sums = self.resumed_sums, None
        return sums

    @property
    def global_step(self) -> int:
        return self.run.scheduler.last_epoch

    def check(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> bool:
        """True when every rank's loss and gradients are finite (then step); decides saves and stops."""
        fault = _test_fault(self.info.rank, self.global_step)
        if fault == "exit":
            os._exit(3)
        if fault == "hang":  # unresponsive to the others; a signal ends it (as SIGKILL would a real hang)
            while self.signal_name is None:
                time.sleep(0.1)
        if fault == "nan":
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.fill_(float("nan"))
        # With fp16 loss scaling, inf gradients are expected and handled by the scaler itself.
        ok = _finite(loss, optimizer, check_grads=not scaler.is_enabled())
        minutes = self.cfg.save_every_minutes
        due = self.info.is_main and (
            (self.cfg.save_every > 0 and self.steps_since_save + 1 >= self.cfg.save_every)
            or (minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes))
        device = self.info.device
        flags = torch.cat([(~ok).reshape(1).float().to(device),
                           torch.tensor([float(due), float(self.signal_name is not None)], device=device)])
        self._mark_progress()
        bad, self._save_now, self._stop_now = (all_reduce_sum(flags) > 0).tolist()
        self.run.checked_step(finite=not bad)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            get_logger().warning(f"non-finite loss or gradient at step {self.global_step}: optimizer step skipped on "
                                 f"every rank ({self.run.bad_steps} in a row, {self.run.skipped} this epoch)")
        return not bad

    def end_step(self, meter_sums: Optional[torch.Tensor], terms: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """After the step: report it, count it, save last.pth when due, stop when asked to.
        terms: the step's per-prompt loss terms and metrics, for on_step (TensorBoard)."""
        if self.on_step is not None and terms is not None and self.run.bad_steps == 0:
            self.on_step(self.global_step, terms, self.run.scheduler.get_last_lr()[0])
        self.run.end_step()
        self.steps_since_save += 1
        too_many = self.run.bad_steps > self.cfg.max_bad_steps
        if self._save_now or self._stop_now or too_many:
            self.save(meter_sums)
            self.last_save, self.steps_since_save = time.monotonic(), 0
        if too_many:
            raise TrainingStopped(
                f"{self.run.bad_steps} optimizer steps in a row had a non-finite loss or gradient (more than "
                f"--max_bad_steps {self.cfg.max_bad_steps}); stopped. last.pth holds the weights before them; "
                f"lower --lr or check the data, then {self.resume_hint}", exit_code=1)
        if self._stop_now:
            self._raise_stop()

    def end_epoch(self) -> None:
        """After the epoch's last.pth: stop now if a signal came during validation."""
        flag = torch.tensor([float(self.signal_name is not None)], device=self.info.device)
        if all_reduce_sum(flag).item() > 0:
            self._raise_stop()

    def _raise_stop(self) -> None:
        name = self.signal_name or "a signal on another rank"
        code = 128 + int(getattr(signal, self.signal_name, signal.SIGTERM)) if self.signal_name else 143
        raise TrainingStopped(f"stopped by {name} at epoch {self.run.epoch + 1} step {self.run.step}; last.pth saved. "
                              f"To continue: {self.resume_hint}", exit_code=code)

    def _mark_progress(self) -> None:
        if is_dist():
            dist.distributed_c10d._get_default_store().set(PROGRESS_KEY.format(self.info.rank), str(self.global_step))


@contextmanager
def stop_signals(guard: StepGuard):
    """SIGINT/SIGTERM ask the guard to stop after the current step. Repeats change nothing: a
    worker can get the same signal from its process group and from its launcher (SIGKILL still ends
    it at once)."""
    def handler(signum, frame):
        if guard.signal_name is None:
            guard.signal_name = signal.Signals(signum).name
            get_logger().warning(f"got {guard.signal_name}: saving last.pth after this step, then stopping")

    previous: Dict[int, object] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def faults_to_exit(info: DistInfo, guard: StepGuard):
    """A planned stop or a lost rank ends this process with one clear log line and a non-zero code
    (the launcher's clean-up, leaving the process group, still runs)."""
    try:
        yield
    except TrainingStopped as err:
        if info.is_main:  # every rank stops for the same reason: say it once
            get_logger().error(str(err))
        raise SystemExit(err.exit_code) from None
    except WriteError as err:  # the rank that writes (rank 0); the others then lose it
        get_logger().error(write_failure_message(err))
        raise SystemExit(1) from None
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        if guard.signal_name:  # the same Ctrl-C stopped a rank still starting up
            get_logger().warning(f"rank {info.rank}: stopped by {guard.signal_name}; another rank stopped before "
                                 "training started, so nothing new was saved")
            raise SystemExit(128 + int(getattr(signal, guard.signal_name))) from None
        get_logger().error(lost_rank_message(err, info))
        raise SystemExit(1) from None


def _saved_at(path: Path) -> Optional[str]:
    """'epoch 3', or 'epoch 4 step 120' for a mid-epoch last.pth; None if unreadable. mmap: only
    the few bytes of the numbers are read, however large the file."""
    try:
        saved = load_data_only(path, mmap=True)
        done, step = int(saved["epoch"]), int(saved.get("step") or 0)
    except Exception:  # a damaged file: the message goes on without its epoch
        return None
    return f"epoch {done + 1} step {step}" if step else f"epoch {done}"


def write_failure_message(err: WriteError) -> str:
    """One line: which file could not be written and why, what in the run folder is intact, what
    to do, and the command that resumes (when there is a last.pth to resume from)."""
    folder = err.path.parent
    kept = {name: _saved_at(folder / name) for name in ("best.pth", "last.pth") if (folder / name).is_file()}
    if err.errno in (errno.EFBIG,):
        fix = "raise the file size limit (ulimit -f)"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {folder} writable"
    else:
        fix = "free space on its disk"
    if not kept:
        return f"{err}; the run stopped before its first save, nothing to resume: {fix} and start it again"
    names = " and ".join(kept)
    epochs = set(kept.values())
    when = f" ({epochs.pop()})" if len(epochs) == 1 and None not in epochs else ""
    if not when:
        names = " and ".join(f"{n} ({e})" if e else n for n, e in kept.items())
    intact = f"{names} in {folder} {'are' if len(kept) > 1 else 'is'} intact{when}"
    if "last.pth" not in kept:
        return f"{err}; the run stopped. {intact}; no last.pth yet, so nothing to resume: {fix} and start it again"
    return f"{err}; the run stopped. {intact}. To continue, {fix}, then: {resume_command(folder)}"


def is_collective_failure(err: BaseException) -> bool:
    """A failed or timed-out collective (gloo, NCCL), as opposed to a bug in this rank."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return is_dist() and any(w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out"))


def lost_rank_message(err: BaseException, info: DistInfo) -> str:
    """Which rank stopped: the one(s) whose last recorded step is behind the others'."""
    head = f"rank {info.rank}: a collective operation failed ({str(err).splitlines()[0][:200]})"
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = [PROGRESS_KEY.format(r) for r in range(info.world_size)]
        steps = {r: int(store.get(k)) if store.check([k]) else -1 for r, k in enumerate(keys)}
    except Exception:  # the store lives with rank 0 (or the launcher): gone with it
        return f"{head}; the process group's store is unreachable, so rank 0 (or its launcher) is gone"
    latest = max(steps.values())
    behind = [r for r, s in steps.items() if s < latest]
    if not behind:
        return f"{head}; could not tell which rank failed (all reached step {latest}); see the other ranks' logs"
    names = ", ".join(f"rank {r} (last at step {steps[r]})" for r in behind)
    return f"{head}: {names} died or stopped responding while the others reached step {latest}"
