"""The resume state (last.pth): what it holds, how it is checked, and how a run continues from it.

last.pth is written by rank 0 (atomically) at every epoch end and in the middle of an epoch
(--save_every steps, --save_every_minutes of wall time). It holds everything a run changes:

    format       RESUME_FORMAT
    model        the trained parameters and trained BatchNorm statistics (trainable.trained_state_dict)
    optimizer, scheduler, scaler   their state dicts
    epoch        epochs completed;  step  optimizer steps done in the current epoch
    world_size, batch_size, accumulate, steps_per_epoch   the geometry that step counts refer to
                 (batch_size: images per micro-batch, or objects with --objects_per_step)
    data_order   the current epoch's global sample order (dataset indices)
    meter        every rank's running sums of the current epoch (so its metrics cover all of it)
    rng          every rank's RNG states (torch's as tensors, numpy's and Python's as tensors of their
                 words); both lists indexed by rank
    best, stale, bad_steps   early stopping and non-finite step counters
    args         the run's TrainConfig as a dict

Every value is a tensor or a plain number, string, list or dict, so the file loads with
torch.load(..., weights_only=True): reading a last.pth from elsewhere cannot run code.

A resumed run skips the batches already seen without loading them (ResumableSampler starts at
an offset), so with the same world size it trains exactly as an uninterrupted run would. So does
a run resumed on another number of processes when the global batch (processes x batch x
accumulate) can be kept: the sampler's one global order puts the same samples into every
optimizer step for any split, every random draw is seeded per image and object, and --accumulate
is chosen to fill the difference (keep_global_batch).
"""

import dataclasses
import json
import multiprocessing
import os
import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
import torch

from ..utils.distributed import launched_by_torchrun, torchrun_restarts
from ..utils.log import get_logger
from ..utils.save_weight import UnsafeFileError, load_data_only, strip_prefixes
from ..utils.trainable import trained_state_dict
from ..utils.weights import inspect_weights
from ..utils.data.samplers import ResumableSampler

RESUME_FORMAT = "sam-resume-v3"
# v2 held numpy's and Python's generator states as pickled objects; its files still load, data-only.
READABLE_FORMATS = ("sam-resume-v2", RESUME_FORMAT)
# What defines the schedule and the model: a resumed run may not change these (what trains
# is checked through the keys of the resume file; --accumulate through the global batch,
# keep_global_batch).
RESUME_MUST_MATCH = ("model_type", "image_size", "epoch", "batch_size", "objects_per_step", "lr", "attention", "fft_blocks")
# With --objects_per_step, steps are cut by each object's estimated cost, which these set too.
OBJECT_STEPS_MUST_MATCH = ("loss_size",)
# Flags that --resume RUN never takes from the saved run: they say where to continue.
NOT_INHERITED = ("resume", "output_dir")


class ResumeError(ValueError):
    """last.pth cannot be used for this run; the message says why and what to do."""


# ----------------------------------------------------------------------------- finding and reading


def find_resume_file(resume: str, output_dir: Optional[str] = None) -> Path:
    """--resume PATH|auto -> the last.pth to read. auto: the --output_dir's last.pth."""
    if resume == "auto":
        if not output_dir:
            raise ResumeError("--resume auto continues the run in --output_dir; give --output_dir too")
        p = Path(output_dir) / "last.pth"
    else:
        p = Path(resume)
        p = p / "last.pth" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--resume: {p} does not exist")
    return p


def resolve_resume(resume: Optional[str], output_dir: Optional[str] = None) -> Optional[str]:
    """--resume as given -> the run to continue, or None for a new run.

    auto: --output_dir when it holds a last.pth, else a new run in that folder (absent or empty).
    One command line thus both starts a run and continues it after a requeue or a restart. A
    folder with files but no last.pth is refused rather than written over: it is either a run
    killed before its first save or not a run folder at all."""
    if resume != "auto":
        return resume
    if not output_dir:
        raise ResumeError("--resume auto continues the run in --output_dir; give --output_dir too")
    folder = Path(output_dir)
    if (folder / "last.pth").is_file():
        return str(folder)
    if folder.is_dir() and any(folder.iterdir()):
        raise ResumeError(f"--resume auto: {folder} holds files but no last.pth (a run stopped before its first "
                          "save, or not a run folder); remove it or choose another --output_dir")
    return None


def restart_problem(resume: Optional[str]) -> Optional[str]:
    """Why workers under `torchrun --max_restarts K` could not be restarted usefully, or None.

    A restarted group runs the same command line, so it needs --resume (auto: start or continue
    --output_dir). And torchrun hosts one key-value store for every attempt of a group unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the new workers would read the dead attempt's addresses
    from it and try to connect to them, and the group would never form."""
    restarts = torchrun_restarts()[1]
    if not restarts:
        return None
    if not resume:
        return (f"torchrun --max_restarts {restarts} restarts the workers after a failure; give --output_dir DIR "
                "--resume auto so that they continue DIR/last.pth")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"torchrun --max_restarts {restarts}: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (the "
                "launch scripts do), else a restarted group reads the failed workers' addresses from torchrun's "
                "store and never forms")
    return None


def run_folder(resume: str, output_dir: Optional[str] = None) -> Path:
    return find_resume_file(resume, output_dir).parent


def load_state(path: Path) -> Dict:
    """Read last.pth, data only; a clear error for a truncated file, a file that holds code, or
    another kind of file."""
    try:
        state = load_data_only(path)
    except UnsafeFileError as err:
        raise ResumeError(f"--resume: {err}") from None
    except Exception:  # truncated zip, not a torch file: torch's wording varies (and suggests unsafe loading)
        raise ResumeError(f"--resume: {path} is {inspect_weights(path).describe()}; expected a last.pth "
                          "written by run.py") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ResumeError(f"--resume: {path} is not a resume file of this version (format {found!r}, "
                          f"expected {RESUME_FORMAT!r} as written by run.py into last.pth)")
    return state


def saved_args(resume: str, output_dir: Optional[str], known: Set[str]) -> Dict:
    """The flags of the run to continue: its newest args file (args.json, or the args.resume-*.json
    of a later resume), else the args inside last.pth. Flags this version does not know (not in
    known) are dropped."""
    folder = run_folder(resume, output_dir)
    files = sorted(folder.glob("args.resume-*.json")) or [folder / "args.json"]
    if files[-1].is_file():
        args = json.loads(files[-1].read_text())
    else:
        args = load_state(find_resume_file(resume, output_dir))["args"]
    return {k: v for k, v in args.items() if k in known and k not in NOT_INHERITED}


def check_resume(cfg) -> Path:
    """Before any worker starts: the resume file is readable and continues the same schedule
    (the cosine learning rate spans --epoch; model type, input size, batch size and learning rate
    define what was trained). Returns the run folder."""
    path = find_resume_file(cfg.resume, cfg.output_dir)
    state = load_state(path)
    # A flag newer than the run is compared with its default (the value the run had in effect).
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    keys = RESUME_MUST_MATCH + (OBJECT_STEPS_MUST_MATCH if cfg.objects_per_step else ())
    saved = {k: state["args"].get(k, defaults[k]) for k in keys}
    changed = [f"--{k} {saved[k]} (now {getattr(cfg, k)})" for k in keys if saved[k] != getattr(cfg, k)]
    if changed:
        raise ResumeError(f"--resume: {path} was made with " + ", ".join(changed) + "; resume with the same flags")
    return path.parent


@dataclass(frozen=True)
class Geometry:
    """How a run splits its global batch: processes x batch per process x accumulated batches.
    Step counts in last.pth refer to it."""

    world_size: int
    batch_size: int
    accumulate: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulate

    def __str__(self) -> str:
        return f"{self.world_size} process(es) x batch {self.batch_size} x accumulate {self.accumulate}"


def saved_geometry(path: Path) -> Geometry:
    """The geometry last.pth was written with (memory-mapped: only its few numbers are read)."""
    try:
        state = load_data_only(path, mmap=True)
    except Exception:  # unreadable: check_resume has already said why, or restore will
        state = load_state(path)
    return Geometry(int(state["world_size"]), int(state["batch_size"]), int(state["accumulate"]))


@dataclass(frozen=True)
class WorldChange:
    """A resume on another number of processes: the --accumulate this run uses and what to log."""

    accumulate: int
    exact: bool  # the global batch is kept: the run continues as it would have
    message: str


def keep_global_batch(saved: Geometry, world_size: int, batch_size: int, accumulate: int, relaxed: bool,
                      path) -> Optional[WorldChange]:
    """None when the run resumes on its own world size (then --accumulate must be the saved one).

    On another world size, the --accumulate that keeps the global batch, whatever was asked for:
    the sampler's global order then puts the same samples into every optimizer step, so the run
    continues exactly (to the rounding of a different reduction order). When no whole number
    keeps it: --resume_relaxed continues with the schedule mapped through the samples seen (data
    order and random numbers not reproduced); without it, ResumeError with the reason."""
    if world_size == saved.world_size:
        if accumulate != saved.accumulate:
            raise ResumeError(f"--resume: {path} was made with --accumulate {saved.accumulate} (now {accumulate}) "
                              "on the same world size; resume with the same flags")
        return None
    per_step = world_size * batch_size
    if saved.global_batch % per_step == 0:
        fitted = saved.global_batch // per_step
        return WorldChange(fitted, True, (
            f"resuming a run of {saved} on {world_size} process(es): --accumulate {fitted} keeps its global batch "
            f"of {saved.global_batch} ({world_size} x batch {batch_size} x {fitted}), so it continues exactly"))
    reason = (f"{path} was written by a run of {saved} (global batch {saved.global_batch}); with {world_size} "
              f"process(es) x batch {batch_size} no whole --accumulate keeps that global batch")
    if relaxed:
        return WorldChange(accumulate, False, (
            f"--resume_relaxed: {reason}; the learning-rate schedule is recomputed from the samples seen; data order "
            "and random numbers are NOT reproduced"))
    divisors = [n for n in range(1, saved.global_batch + 1) if saved.global_batch % (n * batch_size) == 0]
    raise ResumeError(f"--resume: {reason}. Resume with a world size of {', '.join(map(str, divisors))}, or add "
                      "--resume_relaxed True to continue with the schedule recomputed from the samples seen")


# ----------------------------------------------------------------------------- RNG


def rng_state() -> Dict:
    """This process's generator states as tensors and plain numbers (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    """Restore rng_state()'s states exactly; also takes the older format's pickled states."""
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["words"].tolist()), python_state["gauss_next"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data order


# ----------------------------------------------------------------------------- state dict


def make_state(run, sampler: ResumableSampler, meters: List[Optional[torch.Tensor]], rng: List[Dict]) -> Dict:
    """The resume state of a Training (engine.Training) at its current epoch and step; meters and
    rng are every rank's epoch sums and RNG states, indexed by rank."""
    return {
        "format": RESUME_FORMAT, "model": trained_state_dict(run.sam), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
        "epoch": run.epoch, "step": run.step, "world_size": sampler.num_replicas, "batch_size": sampler.batch_size, "accumulate": sampler.accumulate,
        "steps_per_epoch": sampler.steps_per_epoch, "data_order": sampler.global_order(run.epoch),
        "meter": meters,
        "rng": rng, "best": run.best, "stale": run.stale, "bad_steps": run.bad_steps, "skipped": run.skipped,
        "args": run.cfg.to_dict(),
    }


def _listing(title: str, keys) -> str:
    keys = sorted(keys)
    return f"{title} ({len(keys)}): " + ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")


def check_model_keys(saved: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], path: Path) -> None:
    """Every trained tensor present, nothing extra, every shape equal; else one ResumeError."""
    problems = []
    if saved.keys() - own.keys():
        problems.append(_listing("in the file but not trained by this run", saved.keys() - own.keys()))
    if own.keys() - saved.keys():
        problems.append(_listing("trained by this run but missing from the file", own.keys() - saved.keys()))
    shapes = [f"{k} {tuple(saved[k].shape)} (model {tuple(own[k].shape)})" for k in sorted(saved.keys() & own.keys())
              if saved[k].shape != own[k].shape]
    if shapes:
        problems.append(_listing("with another shape", shapes))
    if problems:
        raise ResumeError(f"--resume: {path} does not fit this model: " + "; ".join(problems))


def check_optimizer(saved: Dict, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Same parameter count per group and moment tensors of the parameters' shapes."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    counts = [len(g["params"]) for g in saved["param_groups"]]
    if counts != [len(g["params"]) for g in optimizer.param_groups]:
        raise ResumeError(f"--resume: {path} holds an optimizer for {sum(counts)} parameter tensors, this run trains {len(params)}")
    for index, p in enumerate(params):
        for name, value in saved["state"].get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise ResumeError(f"--resume: {path}: optimizer {name} of parameter {index} has shape "
                                  f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")


def restore(run, state: Dict, path: Path, sampler: ResumableSampler, rank: int) -> Optional[torch.Tensor]:
    """Check a resume state and hand it to run (engine.Training.resume_from); returns this rank's
    share of the epoch's meter sums.

    With another world size and the same global batch (keep_global_batch, checked before) the
    step and schedule carry over as they are. With --resume_relaxed and another global batch the
    position in the epoch is mapped through the number of samples seen and the schedule recomputed
    from it."""
    own = trained_state_dict(run.sam)
    saved = strip_prefixes(state["model"])
    check_model_keys(saved, own, path)
    check_optimizer(state["optimizer"], run.optimizer, path)
    old = Geometry(state["world_size"], state["batch_size"], state["accumulate"])
    same_world = old.world_size == sampler.num_replicas
    same_steps = old.global_batch == sampler.num_replicas * sampler.samples_per_step
    if same_steps and sampler.global_order(state["epoch"]) != state["data_order"]:
        raise ResumeError(f"--resume: the training set is not the one {path} was trained on "
                          f"({len(state['data_order'])} samples then, {len(sampler.global_order(0))} now, or another order)")
    if same_steps and not same_world and state["steps_per_epoch"] != sampler.steps_per_epoch:
        # Only an epoch's last round, cut by the world size (ObjectBatchSampler), can change the count.
        get_logger().warning(f"resume: an epoch has {sampler.steps_per_epoch} steps on this world size, "
                             f"{state['steps_per_epoch']} before; the schedule is mapped through the samples seen")
        same_steps = False
    if same_steps:  # the same world size, or another that keeps the global batch: the same steps
        step = state["step"]
    else:
        seen = state["step"] * old.global_batch
        step = min(seen // (sampler.num_replicas * sampler.samples_per_step), sampler.steps_per_epoch)
    run.resume_from(state, saved, step)
    if same_world:
        set_rng_state(state["rng"][rank])
        return state["meter"][rank]
    if same_steps:
        set_rng_state(shared_rng_state(state["rng"]))
        if rank == 0 and trains_batch_norm(run.sam):
            get_logger().warning("resume on another world size: BatchNorm layers train in this run, and each normalises "
                                 "the micro-batch of one process (all processes' with SyncBatchNorm); another split of "
                                 "the global batch gives them other batch statistics, so the run continues close to, "
                                 "not exactly as, the uninterrupted one")
        return merged_meter(state["meter"]) if rank == 0 else None
    run.seek_schedule(state["epoch"] * sampler.steps_per_epoch + step)
    return None  # the partial epoch's sums belong to another sharding


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


def trains_batch_norm(model: torch.nn.Module) -> bool:
    """A BatchNorm layer with trained parameters (the semantic head, a training TinyViT): its
    statistics come from each micro-batch, which depends on how the global batch is split."""
    kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    return any(isinstance(m, kinds) and any(p.requires_grad for p in m.parameters()) for m in model.modules())


def shared_rng_state(states: List[Dict]) -> Dict:
    """The generator state every rank had (nothing in training draws per-rank numbers: prompts and
    augmentations have their own per-image Generators, and every rank seeds and consumes the global
    ones alike), to hand to the ranks of another world size. Ranks that disagree are logged: the
    continuation is then not exact, and rank 0's state is used."""
    first = states[0]
    for rank, other in enumerate(states[1:], start=1):
        if not _same_state(first, other):
            get_logger().warning(f"resume: rank {rank}'s random generator state differs from rank 0's; every rank of "
                                 "this run continues from rank 0's, so random draws may not be reproduced")
            break
    return first


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_state, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and bool((a == b).all())
    return a == b


def merged_meter(meters: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """Every old rank's running sums of the epoch added up: the meter reduces sums over ranks at the
    epoch's end, so rank 0 carrying the total (and the others nothing) gives the same epoch metrics."""
    present = [m for m in meters if m is not None]
    return torch.stack(present).sum(0) if present else None
