"""One training run: the set-up in a fixed order, the epoch loop, early stop, checkpoints; the run state.

Set-up order (fit): the checks (preflight.py, once) -> build the model, load its weights, freeze
what does not train -> to its device -> the embedding cache (its key hashes the loaded encoder) ->
the datasets (given the cache) and loaders -> the step module in DDP -> optimizer -> restore a
resume state. Rank 0 writes every file; all ranks train and validate their own shards. What
differs between training modes is the task's (training/tasks/); the engine never branches on it.
"""

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..build_sam import sam_model_registry
from ..modeling.fft_attention import attention_metadata, fft_block_indices
from ..utils.data import RunData, collate
from ..utils.data.cache import EmbeddingCache, open_cache
from ..utils.data.samplers import EpochSampler, ObjectBatchSampler, ResumableSampler, object_cost, piece_cost
from ..utils.distributed import DistInfo, all_gather_objects, barrier, torchrun_restarts
from ..utils.log import FILE_ONLY, add_log_file, get_logger
from ..utils.save_weight import append_text, atomic_save, atomic_write_bytes, image_flags, save_partial_weight, unwrap_model
from ..utils.trainable import configure, export_weights, lora_metadata, parameter_report
from ..utils.trainer import evaluate, train_one_epoch
from .compile import compile_decode
from .config import TrainConfig
from .faults import StepGuard, faults_to_exit, startup_test_fault, stop_signals
from .preflight import Prepared, PreflightError, share_preflight
from .progress import Progress, shard_images
from .resume import ResumeError, find_resume_file, load_state, make_state, restore, resume_command, rng_state
from .tasks import Task
from .writer import N_SAMPLES, RunWriter, device_label



def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def build_model(cfg: TrainConfig, task: Task):
    sam = sam_model_registry[cfg.model_type](checkpoint=cfg.checkpoint_path(), image_size=cfg.image_size,
                                             attention=cfg.attention, fft_blocks=cfg.fft_blocks)
    configure(sam, task.spec.plan)
    task.adapt_model(sam)
    return sam


def make_loaders(cfg: TrainConfig, info: DistInfo, data: RunData, task: Task, cache: Optional[EmbeddingCache] = None):
    workers = cfg.num_workers if cfg.num_workers is not None else (4 if info.device.type == "cuda" else 0)
    train_ds, val_ds = task.datasets(data, cache)
    common = dict(collate_fn=collate, num_workers=workers, pin_memory=info.device.type == "cuda",
                  persistent_workers=workers > 0)
    # Explicit replicas/rank: the same sampler (same permutation) for 1 process and for N. The
    # epoch travels with each index, so persistent workers draw this epoch's objects and prompts.
    if cfg.objects_per_step:
        # Steps cut by estimated cost: an object of a large image costs more with the loss at its size.
        costs = [object_cost(size, cfg.image_size, cfg.loss_size) for size in train_ds.image_sizes()]
        sampler = ObjectBatchSampler(train_ds.object_counts(), cfg.objects_per_step, cfg.accumulate,
                                     num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
                                     costs=costs, piece_cost=piece_cost())
        train = DataLoader(train_ds, batch_sampler=sampler, **common)
    else:
        sampler = EpochSampler(ResumableSampler(train_ds, cfg.batch_size, cfg.accumulate, num_replicas=info.world_size,
                                                rank=info.rank, shuffle=True, seed=cfg.seed))
        train = DataLoader(train_ds, sampler=sampler, batch_size=cfg.batch_size, **common)
    common["batch_size"] = cfg.batch_size
    # Validation shards whole images without padding: every object is scored exactly once.
    val = DataLoader(torch.utils.data.Subset(val_ds, val_ds.shard(info.rank, info.world_size)), shuffle=False, **common)
    return train, val, sampler


@dataclass
class Training:
    """Everything a run updates, built in the fixed order and saved to / restored from last.pth.
    Its methods are the only code that changes it (StepGuard and resume.restore() call them)."""

    cfg: TrainConfig
    sam: torch.nn.Module
    model: torch.nn.Module  # what the step calls: the DDP wrapper, or SamTrainStep alone
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    task: Task
    cache: Optional[EmbeddingCache]  # opened after the model (its key hashes the loaded weights)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done in the current epoch (skipped ones included)
    bad_steps: int = 0  # non-finite steps in a row
    skipped: int = 0  # non-finite steps skipped in the current epoch
    best: Dict = field(default_factory=lambda: {"iou": -1.0})
    stale: int = 0  # epochs since the best validation IoU

    @classmethod
    def build(cls, cfg: TrainConfig, info: DistInfo, sam: torch.nn.Module, amp_dtype: Optional[torch.dtype],
              cache: Optional[EmbeddingCache], steps_per_epoch: int, task: Task) -> "Training":
        """The step module around the built model (sam, on its device), DDP, optimizer, schedule."""
        model = task.step_module(sam, info.device, info.world_size)
        if cfg.compile:  # before DDP: only the inner decode is compiled (training/compile.py; not the semantic head)
            compile_decode(model)
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            model = DDP(model, device_ids=device_ids, **task.ddp_options(task.spec.plan))
        optimizer = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        total = max(cfg.epoch * steps_per_epoch, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
        return cls(cfg, sam, model, optimizer, scheduler, scaler, amp_dtype, task, cache)

    def restore(self, cfg: TrainConfig, info: DistInfo, sampler: ResumableSampler) -> Optional[torch.Tensor]:
        """Continue from --resume (its world size checked by preflight); returns the partial epoch's meter sums."""
        path = find_resume_file(cfg.resume, cfg.output_dir)
        sums = restore(self, load_state(path), path, sampler, info.rank)
        return None if sums is None else sums.to(info.device)

    def resume_from(self, state: Dict, weights: Dict[str, torch.Tensor], step: int) -> None:
        """Take a resume state that restore() checked: the trained tensors (weights, prefixes
        stripped), optimizer, schedule, scaler and counters; step: the position in the epoch."""
        with torch.no_grad():
            entries = unwrap_model(self.sam).state_dict()  # parameters and trained BatchNorm statistics
            for key, value in weights.items():
                entries[key].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.stale = state["epoch"], state["best"], state["stale"]
        self.bad_steps, self.skipped = state["bad_steps"], state["skipped"]
        self.step = step

    def seek_schedule(self, global_step: int) -> None:
        """Put the schedule at global_step, with the learning rates LambdaLR.step() would set there."""
        self.scheduler.last_epoch = global_step
        lrs = [base * f(global_step) for base, f in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def checked_step(self, finite: bool) -> None:
        """Count the all-ranks verdict on a step (StepGuard): a non-finite one is skipped."""
        if finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped += 1

    def end_step(self) -> None:
        """Count an optimizer step of the current epoch, skipped or not."""
        self.step += 1

    def end_epoch(self, val_iou: float, val_metrics: Dict) -> bool:
        """Count the epoch; True when validation IoU improved."""
        self.epoch += 1
        self.step = self.skipped = 0
        if val_iou > self.best["iou"]:
            self.best, self.stale = dict(val_metrics, epoch=self.epoch), 0
            return True
        self.stale += 1
        return False


def run_epoch(run: Training, info: DistInfo, train_loader, val_loader, sampler, guard: StepGuard) -> Tuple[Dict, Dict]:
    """Train (from run.step on: the batches before it are skipped unread) and validate one epoch;
    returns the metrics.jsonl record and the validation metrics."""
    cfg, task = run.cfg, run.task
    sampler.set_epoch(run.epoch, start=run.step)
    t0 = time.perf_counter()
    bar = Progress(total=sampler.images_left(), desc=f"epoch {run.epoch + 1}/{cfg.epoch}", enabled=info.is_main)
    train_m = train_one_epoch(run.model, run.sam, train_loader, run.optimizer, run.scheduler, run.scaler, info.device,
                              run.amp_dtype, progress=bar, accumulate=cfg.accumulate, guard=guard, cache=run.cache,
                              epoch=run.epoch, task=task.loop, first_step=run.step)
    bar.close()
    train_s = time.perf_counter() - t0
    task.after_train(run.sam, info.world_size)
    val_m = validate(run, info, val_loader, task.val_loop, f"validation {run.epoch + 1}/{cfg.epoch}")
    record = task.epoch_record(run.epoch + 1, train_m, val_m, train_s, time.perf_counter() - t0,
                               run.scheduler.get_last_lr()[0], run.skipped, run.cache is not None)
    return record, val_m


def validate(run: Training, info: DistInfo, val_loader, loop, desc: str) -> Dict:
    """evaluate() with rank 0's progress bar (validation can take longer than training)."""
    bar = Progress(total=shard_images(val_loader) * info.world_size, desc=desc, enabled=info.is_main)
    try:
        return evaluate(run.sam, val_loader, info.device, run.amp_dtype, cache=run.cache, task=loop, progress=bar)
    finally:
        bar.close()


def evaluate_base(run: Training, info: DistInfo, val_loader, out_dir: Path) -> Dict:
    """Validation of the starting model (epoch 0 in metrics.jsonl), so every run shows its gain
    over the base; it does not count as a best epoch (best.pth only ever holds trained weights)."""
    t0 = time.perf_counter()
    val_m = validate(run, info, val_loader, run.task.base_loop, "validation 0 (base model)")
    record = run.task.base_record(val_m, time.perf_counter() - t0)
    if info.is_main:
        append_text(out_dir / "metrics.jsonl", json.dumps(record) + "\n")
        get_logger().info(f"epoch 0 (base model) | val loss {record['val_loss']:.4f} IoU {record['val_iou']:.4f} "
                          f"Dice {record['val_dice']:.4f} | {record['seconds']:.1f} s")
    return record


def save_last(run: Training, sampler: ResumableSampler, out_dir: Path, info: DistInfo,
              meter_sums: Optional[torch.Tensor] = None) -> None:
    """Every rank at the same step (RNG states and epoch sums are per rank); rank 0 writes last.pth."""
    sums = None if meter_sums is None else meter_sums.detach().cpu()
    gathered = all_gather_objects((rng_state(), sums))
    if info.is_main:
        rng, meters = zip(*gathered)
        atomic_save(make_state(run, sampler, list(meters), list(rng)), out_dir / "last.pth")


def save_epoch(run: Training, out_dir: Path, record: Dict, improved: bool) -> None:
    """Rank 0: metrics line and best.pth when improved (each written atomically)."""
    append_text(out_dir / "metrics.jsonl", json.dumps(record) + "\n")
    if improved:
        meta = {"model_type": run.cfg.model_type, "image_size": run.cfg.image_size, "epoch": run.epoch,
                "metrics": record, "args": run.cfg.to_dict()}
        meta.update(image_flags(meta["args"]))  # how images were read: tools read theirs the same way
        meta.update(lora_metadata(run.task.spec.plan, run.cfg.lora_save))
        meta.update(attention_metadata(run.sam))
        meta.update(run.task.metadata())
        save_partial_weight(run.sam, out_dir / "best.pth", metadata=meta, weights=export_weights(run.sam, run.cfg.lora_save))
    # The named terms only when there is more than one: "(bce 0.41 iou 0.62 iou_head 0.05)".
    names = run.task.loss.keys()[1:]
    parts = " ".join(f"{k[5:]} {record['train_' + k]:.3f}" for k in names) if len(names) > 1 else ""
    skipped = f" | {record['skipped_steps']} non-finite step(s) skipped" if record["skipped_steps"] else ""
    get_logger().info(
        f"epoch {run.epoch}/{run.cfg.epoch} | train loss {record['train_loss']:.4f}{f' ({parts})' if parts else ''} "
        f"| val loss {record['val_loss']:.4f} "
        f"IoU {record['val_iou']:.4f} Dice {record['val_dice']:.4f}{' (best)' if improved else ''}"
        + (f" (post-processed IoU {record['val_iou_post']:.4f} Dice {record['val_dice_post']:.4f})" if "val_iou_post" in record else "")
        + f" | {record['images_per_sec']:.1f} img/s | {record['seconds']:.1f} s{skipped}"
    )


def start_run_folder(cfg: TrainConfig, out_dir: Path, data: RunData) -> None:
    """Rank 0: the run folder, its log file and the flags."""
    log = get_logger()
    out_dir.mkdir(parents=True, exist_ok=True)
    add_log_file(log, out_dir / "train.log")
    # A resumed run keeps the original args.json and records its own flags beside it.
    args_file = out_dir / "args.json"
    if args_file.exists():
        args_file = out_dir / f"args.resume-{datetime.now():%Y%m%d-%H%M%S}.json"
    args_file.write_text(cfg.to_json())
    for note in data.notes:
        log.info(note)
    if data.skipped:  # --skip_bad: the samples left out, one per line
        (out_dir / "skipped.txt").write_text("\n".join(data.skipped) + "\n")
        log.warning(f"{data.skip_summary}; full list in {out_dir / 'skipped.txt'}")
        for line in data.skipped:  # named in train.log too, not on the console
            log.info(f"skipped: {line}", extra=FILE_ONLY)


def drop_records_after(path: Path, epochs: int) -> int:
    """A run stopped between an epoch's metrics line and that epoch's last.pth resumes from the
    epoch before: the lines of epochs that last.pth does not hold (and a torn last line) go, so
    every epoch is recorded once. Returns how many lines were removed."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("epoch", 0) <= epochs:
                keep.append(line)
        except ValueError:
            pass
    if len(keep) != len(lines):
        atomic_write_bytes("".join(keep).encode(), path)
    return len(lines) - len(keep)


def fit(cfg: TrainConfig, info: DistInfo, prepared: Optional[Prepared] = None) -> Dict[str, float]:
    """Train, validate every epoch, keep best.pth / last.pth / metrics.jsonl; returns the best metrics.

    prepared: preflight(cfg)'s result when the launcher already ran the checks (else rank 0 runs them)."""
    log = get_logger()
    # The same seed on every rank: a randomly initialised model (--checkpoint none) must be the
    # same model everywhere, buffers included (DDP only copies parameters). Nothing in training
    # draws per-rank random numbers; the sampler has its own seed.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    prepared = share_preflight(cfg, info, prepared)
    data, out_dir, task = prepared.data, prepared.out_dir, prepared.task
    if prepared.world is not None:  # resumed on another world size: the accumulation that keeps the global batch
        cfg = dataclasses.replace(cfg, accumulate=prepared.world.accumulate)
    devices = all_gather_objects(device_label(info.device))
    if info.is_main:
        start_run_folder(cfg, out_dir, data)
        log.info(f"world size {info.world_size}: " + ", ".join(f"rank {r} {d}" for r, d in enumerate(devices))
                 + f" | run folder {out_dir}")
        if prepared.world is not None:
            (log.info if prepared.world.exact else log.warning)(prepared.world.message)
    # Seeded again right before the model is built, so a --checkpoint none model depends on the
    # seed alone and the tools (evaluate, predict) can rebuild the exact starting model.
    torch.manual_seed(cfg.seed)
    sam = build_model(cfg, task).to(info.device)
    amp_dtype = amp_dtype_for(cfg, info.device)
    # The cache's key hashes the loaded encoder weights: after the model, before the datasets that read it.
    cache = open_cache(task.spec.cache, sam, amp_dtype, log=info.is_main, images=len(data.train) + len(data.val))
    train_loader, val_loader, sampler = make_loaders(cfg, info, data, task, cache)
    run = Training.build(cfg, info, sam, amp_dtype, cache, sampler.steps_per_epoch, task)
    guard = StepGuard(run, info, lambda sums: save_last(run, sampler, out_dir, info, sums),
                      resume_hint=resume_command(out_dir))
    # The sample pictures decode validation images, so their dataset has no cache.
    # Images per optimizer step (all ranks): by objects, the epoch's mean.
    per_step = (len(data.train) / max(sampler.steps_per_epoch, 1) if cfg.objects_per_step
                else cfg.batch_size * cfg.accumulate * info.world_size)
    writer = (RunWriter(out_dir, task.datasets(data)[1], per_step,
                        n_samples=N_SAMPLES if task.sample_pictures else 0) if info.is_main else None)
    if writer is not None:
        guard.on_step = writer.step
    if cfg.resume:
        try:
            guard.resumed_sums = run.restore(cfg, info, sampler)
        except ResumeError as err:
            raise PreflightError(str(err)) from err
        log.info(f"resumed from {cfg.resume} at epoch {run.epoch + 1}, step {run.step}")
        dropped = drop_records_after(out_dir / "metrics.jsonl", run.epoch) if info.is_main else 0
        if dropped:
            log.info(f"metrics.jsonl: {dropped} line(s) of epochs after last.pth's removed; those epochs train again")
    # Each node counts its own restarts (one restarted for another node's failure may count 0).
    restarts = max(all_gather_objects(torchrun_restarts()))
    if restarts[0] and info.is_main:
        where = (f"from last.pth at epoch {run.epoch + 1}, step {run.step}" if cfg.resume
                 else "from the start (no last.pth had been saved)")
        log.warning(f"torchrun restarted the workers (restart {restarts[0]} of at most {restarts[1]}); the run continues {where}")
    startup_test_fault(info.rank)
    if info.is_main:
        log_summary(run.sam, cfg, info, data, task)
    if cfg.eval_base and run.epoch == 0 and run.step == 0:
        evaluate_base(run, info, val_loader, out_dir)
    with stop_signals(guard), faults_to_exit(info, guard):
        while run.epoch < cfg.epoch:
            record, val_m = run_epoch(run, info, train_loader, val_loader, sampler, guard)
            improved = run.end_epoch(val_m["iou"], val_m)
            if info.is_main:
                save_epoch(run, out_dir, record, improved)
                writer.epoch(record, run.sam, improved)
            save_last(run, sampler, out_dir, info)
            guard.end_epoch()
            if cfg.patience and run.stale >= cfg.patience:
                log.info(f"early stop: no better validation IoU for {run.stale} epochs")
                break
        barrier()
    if writer is not None:
        writer.close()
    log.info(f"best validation IoU {run.best['iou']:.4f} (epoch {run.best.get('epoch')}); weights in {out_dir / 'best.pth'}")
    return run.best


def log_summary(sam, cfg: TrainConfig, info: DistInfo, data: RunData, task: Task) -> None:
    import torchinfo

    log = get_logger()
    summary = torchinfo.summary(sam, depth=1, verbose=0, col_names=("num_params", "trainable"))
    log.info("model %s at %d px\n%s", cfg.model_type, cfg.image_size, summary, extra=FILE_ONLY)
    trained = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in sam.parameters() if not p.requires_grad)
    log.info(f"trainable parameters {trained:,} | frozen {frozen:,}\n{parameter_report(sam)}")
    if fft_block_indices(sam):
        log.info(f"image encoder: FFT token mixing in blocks {', '.join(map(str, fft_block_indices(sam)))} "
                 "(their relative-position tables are kept for the stock keys, unused and frozen)")
    log.info(f"{info.world_size} process(es) on {info.device.type} ({torch.get_num_threads()} CPU threads each), "
             + (f"{cfg.objects_per_step} objects per process per step, " if cfg.objects_per_step
                else f"batch {cfg.batch_size} per process, ")
             + f"{len(data.train)} train / {len(data.val)} val {'tiles' if cfg.tile else 'images'}")
    log.info(task.describe(sam))
