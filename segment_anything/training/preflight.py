"""Every check that can fail before training, run once per run; its result is what fit() takes.

The launcher runs preflight() before any worker starts, so a bad file is one clear line and no
process has to be cleaned up; under torchrun rank 0 runs it and share_preflight() hands every
rank the result or the same error, so no rank starts training alone.
"""

import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..utils.data import DataError, RunData, prepare_data
from ..utils.data.tiling import tile_data
from ..utils.distributed import DistInfo, broadcast_object
from ..utils.weights import check_checkpoint
from .config import RunSpec, TrainConfig
from .resume import WorldChange, check_resume, find_resume_file, keep_global_batch, saved_geometry
from .tasks import Task, build_task

PREFLIGHT_ERRORS = (DataError, FileExistsError, FileNotFoundError, ValueError)


class PreflightError(RuntimeError):
    """A check before training failed; raised on every rank with rank 0's message."""


@dataclass
class Prepared:
    """What the checks found, handed to every worker: the data, the run folder, the resolved
    flags and the task (with --task semantic, its classes); world: a resume on another number of
    processes (the --accumulate that keeps its global batch), else None."""

    data: RunData
    out_dir: Path
    spec: RunSpec
    task: Task
    world: Optional[WorldChange] = None


def resolve_output_dir(cfg: TrainConfig) -> Path:
    """The run folder. A resumed run continues in its own folder; a new run never reuses a
    folder that already holds files, so nothing of an earlier run is overwritten."""
    if cfg.resume:
        out = check_resume(cfg)
        check_writable_folder(out, "--resume")
        return out
    out = Path(cfg.output_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_writable_folder(out, "--output_dir" if cfg.output_dir else "the run folder (--output_dir's default)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds files; choose another --output_dir or continue it with --resume {out}")
    return out


def preflight(cfg: TrainConfig, world_size: int = 1) -> Prepared:
    """Weights file, data files (cut into tiles with --tile), the task (a label value >=
    --num_classes stops the run here, naming the file), output folder, resume file and the world
    size it is resumed on."""
    if not (cfg.train_dir or cfg.train_json):  # the first thing a user without flags must hear
        raise DataError("--train_dir is required (a folder of images and masks or labelme JSON files), "
                        "or --train_json + --train_images for COCO")
    if cfg.checkpoint_path() is not None:
        check_checkpoint(cfg.checkpoint_path(), cfg.model_type, cfg.image_size)
    out_dir = resolve_output_dir(cfg)  # before the data checks: a folder that cannot be written fails at once
    world = None
    if cfg.resume:
        path = find_resume_file(cfg.resume, cfg.output_dir)
        # The micro-batch unit: images, or objects with --objects_per_step (as the sampler saves it).
        world = keep_global_batch(saved_geometry(path), world_size, cfg.objects_per_step or cfg.batch_size,
                                  cfg.accumulate, cfg.resume_relaxed, path)
    spec = cfg.resolve()
    data = prepare_data(spec.data)
    if cfg.tile:  # once, here: every rank trains the same tiles
        data = tile_data(data, cfg.tile, cfg.tile_overlap, cfg.tile_min_visible)
    task = build_task(cfg, spec, data)
    return Prepared(data, out_dir, spec, task, world)


def share_preflight(cfg: TrainConfig, info: DistInfo, prepared: Optional[Prepared]) -> Prepared:
    """The preflight result: from the launcher when it ran the checks, else rank 0 runs them
    (torchrun) and every rank gets the result or PreflightError with rank 0's message."""
    if prepared is not None:
        return prepared
    result = None
    if info.is_main:
        try:
            result = preflight(cfg, info.world_size)
        except PREFLIGHT_ERRORS as err:
            result = str(err)
    result = broadcast_object(result, patient=True)  # the checks may take longer than --dist_timeout
    if isinstance(result, str):
        raise PreflightError(result)
    return result


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
