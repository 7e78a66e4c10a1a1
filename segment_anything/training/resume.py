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
an offset), so with the same world size it trains exactly as an uninterrupted run would.
"""

import dataclasses
import json
import multiprocessing
import os
import random
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
import torch

from ..utils.distributed import launched_by_torchrun
from ..utils.save_weight import UnsafeFileError, load_data_only, strip_prefixes
from ..utils.trainable import trained_state_dict
from ..utils.data.samplers import ResumableSampler

RESUME_FORMAT = "sam-resume-v3"
# v2 held numpy's and Python's generator states as pickled objects; its files still load, data-only.
READABLE_FORMATS = ("sam-resume-v2", RESUME_FORMAT)
# What defines the schedule and the model: a resumed run may not change these (what trains
# is checked through the keys of the resume file).
RESUME_MUST_MATCH = ("model_type", "image_size", "epoch", "batch_size", "objects_per_step", "lr", "accumulate",
                     "attention", "fft_blocks")
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


def run_folder(resume: str, output_dir: Optional[str] = None) -> Path:
    return find_resume_file(resume, output_dir).parent


def load_state(path: Path) -> Dict:
    """Read last.pth, data only; a clear error for a truncated file, a file that holds code, or
    another kind of file."""
    try:
        state = load_data_only(path)
    except UnsafeFileError as err:
        raise ResumeError(f"--resume: {err}") from None
    except Exception as err:  # truncated zip, not a torch file: torch's wording varies
        raise ResumeError(f"--resume: cannot read {path} ({type(err).__name__}: {err}); it may be truncated") from err
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
    saved = {k: state["args"].get(k, defaults[k]) for k in RESUME_MUST_MATCH}
    changed = [f"--{k} {saved[k]} (now {getattr(cfg, k)})" for k in RESUME_MUST_MATCH if saved[k] != getattr(cfg, k)]
    if changed:
        raise ResumeError(f"--resume: {path} was made with " + ", ".join(changed) + "; resume with the same flags")
    return path.parent


def check_world_size(state: Dict, world_size: int, relaxed: bool, path: Path) -> Optional[str]:
    """None when the run continues exactly; a warning text with --resume_relaxed; else ResumeError."""
    old = state["world_size"]
    if old == world_size:
        return None
    if not relaxed:
        raise ResumeError(
            f"--resume: {path} was written by a run with world size {old}, this run has world size {world_size}; "
            f"the global batch and the steps per epoch would change. Resume with {old} processes, or add "
            "--resume_relaxed True to continue with the schedule recomputed from the global step")
    return (f"resuming a world-size-{old} run with world size {world_size} (--resume_relaxed): the learning-rate "
            "schedule is recomputed from the samples seen; data order and random numbers are NOT reproduced")


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
    """Check a resume state and hand it to run (engine.Training.resume_from); returns the epoch's meter sums.

    With another world size (--resume_relaxed, checked before) the position in the epoch is
    mapped through the number of samples seen and the schedule recomputed from it."""
    own = trained_state_dict(run.sam)
    saved = strip_prefixes(state["model"])
    check_model_keys(saved, own, path)
    check_optimizer(state["optimizer"], run.optimizer, path)
    same_world = state["world_size"] == sampler.num_replicas
    if same_world and sampler.global_order(state["epoch"]) != state["data_order"]:
        raise ResumeError(f"--resume: the training set is not the one {path} was trained on "
                          f"({len(state['data_order'])} samples then, {len(sampler.global_order(0))} now, or another order)")
    if same_world:
        step = state["step"]
    else:
        seen = state["step"] * state["world_size"] * state["batch_size"] * state["accumulate"]
        step = min(seen // (sampler.num_replicas * sampler.samples_per_step), sampler.steps_per_epoch)
    run.resume_from(state, saved, step)
    if same_world:
        set_rng_state(state["rng"][rank])
        return state["meter"][rank]
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
