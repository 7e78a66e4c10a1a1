"""One training run: data checks, model set-up in a fixed order, the epoch loop, checkpoints.

Set-up order: build -> load checkpoint -> freeze -> to device -> wrap in DDP -> optimizer ->
restore a resume state. Rank 0 checks the data and writes every file; all ranks train and
validate their own shards.
"""

import json
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..build_sam import sam_model_registry
from .config import TrainConfig
from .data import DataError, MaskDataset, Pair, check_dataset, collate, find_pairs, split_pairs
from .distributed import DistInfo, all_gather_objects, barrier, broadcast_object
from .log import add_log_file, get_logger
from .save_weight import atomic_save, save_partial_weight, strip_prefixes, trainable_state_dict
from .trainer import SamTrainStep, evaluate, freeze, train_one_epoch

RESUME_FORMAT = "sam-resume-v1"


@dataclass
class RunData:
    train: List[Pair]
    val: List[Pair]
    notes: List[str]


def prepare_data(cfg: TrainConfig) -> RunData:
    """Find and check every file before any training starts; raise DataError naming the file."""
    if not cfg.train_dir:
        raise DataError("--train_dir is required (a folder with image/ + mask/ or images/ + labels/)")
    notes = []
    train, report = check_dataset(find_pairs(cfg.train_dir), cfg.mask_threshold)
    notes.append(f"{cfg.train_dir}: {report.n_pairs} pairs, {report.n_empty} with an empty mask skipped")
    if cfg.val_dir:
        val, vreport = check_dataset(find_pairs(cfg.val_dir), cfg.mask_threshold)
        notes.append(f"{cfg.val_dir}: {vreport.n_pairs} pairs, {vreport.n_empty} with an empty mask skipped")
    else:
        train, val = split_pairs(train, cfg.val_fraction, cfg.seed)
        notes.append(f"no --val_dir: seeded split of train_dir, {len(train)} train / {len(val)} val")
    return RunData(train=train, val=val, notes=notes)


def resolve_output_dir(cfg: TrainConfig) -> Path:
    """The run folder. A resumed run continues in its own folder; a new run never reuses a
    folder that already holds files, so nothing of an earlier run is overwritten."""
    if cfg.resume:
        check_resume(cfg)
        resume = Path(cfg.resume)
        return resume if resume.is_dir() else resume.parent
    out = Path(cfg.output_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds files; choose another --output_dir or continue it with --resume {out}")
    return out


RESUME_MUST_MATCH = ("model_type", "image_size", "epoch", "batch_size", "lr")


def check_resume(cfg: TrainConfig) -> None:
    """A resumed run must continue the same schedule: the cosine learning rate spans --epoch,
    and model type, input size, batch size and learning rate define what was trained."""
    path = find_resume_file(cfg.resume)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != RESUME_FORMAT:
        raise ValueError(f"--resume: {path} is not a resume file (last.pth) written by run.py")
    changed = [f"--{k} {state['args'][k]} (now {getattr(cfg, k)})" for k in RESUME_MUST_MATCH
               if state["args"].get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--resume: {path} was made with " + ", ".join(changed) + "; resume with the same flags")


def setup_run(cfg: TrainConfig, info: DistInfo, data: Optional[RunData]) -> Tuple[RunData, Path]:
    """Rank 0 checks data and the output folder; every rank gets the result or the same error."""
    result = None
    if info.is_main:
        try:
            result = (data or prepare_data(cfg), resolve_output_dir(cfg))
        except (DataError, FileExistsError, FileNotFoundError, ValueError) as err:
            result = err
    result = broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result


def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def build_model(cfg: TrainConfig):
    sam = sam_model_registry[cfg.model_type](checkpoint=cfg.checkpoint_path(), image_size=cfg.image_size)
    freeze(sam)
    return sam


def make_loaders(cfg: TrainConfig, info: DistInfo, data: RunData):
    workers = cfg.num_workers if cfg.num_workers is not None else (4 if info.device.type == "cuda" else 0)
    train_ds = MaskDataset(data.train, cfg.image_size, cfg.mask_threshold)
    val_ds = MaskDataset(data.val, cfg.image_size, cfg.mask_threshold)
    # Explicit replicas/rank: the same sampler (same permutation) for 1 process and for N.
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    common = dict(batch_size=cfg.batch_size, collate_fn=collate, num_workers=workers,
                  pin_memory=info.device.type == "cuda", persistent_workers=workers > 0)
    train = DataLoader(train_ds, sampler=sampler, **common)
    # Validation shards without padding: every image is scored exactly once across ranks.
    val_idx = list(range(info.rank, len(val_ds), info.world_size))
    val = DataLoader(torch.utils.data.Subset(val_ds, val_idx), shuffle=False, **common)
    return train, val, sampler


def rng_state() -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume_file(path: str) -> Path:
    p = Path(path)
    p = p / "last.pth" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--resume: {p} does not exist")
    return p


def fit(cfg: TrainConfig, info: DistInfo, data: Optional[RunData] = None) -> Dict[str, float]:
    """Train, validate every epoch, keep best.pth / last.pth / metrics.jsonl; returns the best metrics."""
    log = get_logger()
    # The same seed on every rank: a randomly initialised model (--checkpoint none) must be the
    # same model everywhere, buffers included (DDP only copies parameters). Nothing in training
    # draws per-rank random numbers; the sampler has its own seed.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    data, out_dir = setup_run(cfg, info, data)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        add_log_file(log, out_dir / "train.log")
        # A resumed run keeps the original args.json and records its own flags beside it.
        args_file = out_dir / "args.json"
        if args_file.exists():
            args_file = out_dir / f"args.resume-{datetime.now():%Y%m%d-%H%M%S}.json"
        args_file.write_text(cfg.to_json())
        for note in data.notes:
            log.info(note)

    sam = build_model(cfg)
    sam.to(info.device)
    step = SamTrainStep(sam)
    model = step
    if info.world_size > 1:
        # Frozen parts are in eval mode and their buffers never change: no need to broadcast them.
        model = DDP(step, device_ids=[info.device.index] if info.device.type == "cuda" else None, broadcast_buffers=False)
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader, val_loader, sampler = make_loaders(cfg, info, data)
    total_steps = cfg.epoch * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1)))
    )
    amp_dtype = amp_dtype_for(cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best, stale = 0, {"iou": -1.0}, 0
    if cfg.resume:
        state = torch.load(find_resume_file(cfg.resume), map_location="cpu", weights_only=False)
        with torch.no_grad():
            own = sam.state_dict()
            for key, value in strip_prefixes(state["model"]).items():
                own[key].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, stale = state["epoch"], state["best"], state["stale"]
        if len(state["rng"]) == info.world_size:
            set_rng_state(state["rng"][info.rank])
        log.info(f"resumed from {cfg.resume} after epoch {start_epoch}")

    if info.is_main:
        log_summary(sam, cfg, info, data)
    for epoch in range(start_epoch, cfg.epoch):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        bar = tqdm(total=len(sampler) * info.world_size, desc=f"epoch {epoch + 1}/{cfg.epoch}", unit="img",
                   disable=not info.is_main, leave=False, dynamic_ncols=True)
        train_m = train_one_epoch(model, sam, train_loader, optimizer, scheduler, scaler, info.device, amp_dtype,
                                  cfg.iou_loss_weight, progress=bar)
        bar.close()
        train_s = time.perf_counter() - t0
        val_m = evaluate(sam, val_loader, info.device, amp_dtype, cfg.iou_loss_weight)
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": train_m["loss"], "train_iou": train_m["iou"],
                  "val_loss": val_m["loss"], "val_iou": val_m["iou"], "val_dice": val_m["dice"],
                  "images_per_sec": train_m["images"] / train_s, "seconds": seconds,
                  "lr": scheduler.get_last_lr()[0]}
        improved = val_m["iou"] > best["iou"]
        if improved:
            best, stale = dict(val_m, epoch=epoch + 1), 0
        else:
            stale += 1
        rng = all_gather_objects(rng_state())
        if info.is_main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            meta = {"model_type": cfg.model_type, "image_size": cfg.image_size, "epoch": epoch + 1,
                    "metrics": record, "args": cfg.to_dict()}
            if improved:
                save_partial_weight(sam, out_dir / "best.pth", metadata=meta)
            atomic_save({"format": RESUME_FORMAT, "model": trainable_state_dict(sam),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best, "stale": stale,
                          "rng": rng, "args": cfg.to_dict()}, out_dir / "last.pth")
            log.info(
                f"epoch {epoch + 1}/{cfg.epoch} | train loss {record['train_loss']:.4f} | val loss {record['val_loss']:.4f} "
                f"IoU {record['val_iou']:.4f} Dice {record['val_dice']:.4f}{' (best)' if improved else ''} | "
                f"{record['images_per_sec']:.1f} img/s | {seconds:.1f} s"
            )
        if cfg.patience and stale >= cfg.patience:
            log.info(f"early stop: no better validation IoU for {stale} epochs")
            break
    barrier()
    if info.is_main:
        log.info(f"best validation IoU {best['iou']:.4f} (epoch {best.get('epoch')}); weights in {out_dir / 'best.pth'}")
    return best


def log_summary(sam, cfg: TrainConfig, info: DistInfo, data: RunData) -> None:
    import torchinfo

    log = get_logger()
    summary = torchinfo.summary(sam, depth=1, verbose=0, col_names=("num_params", "trainable"))
    log.info("model %s at %d px\n%s", cfg.model_type, cfg.image_size, summary)
    trained = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in sam.parameters() if not p.requires_grad)
    log.info(f"trainable parameters {trained:,} | frozen {frozen:,}")
    log.info(f"{info.world_size} process(es) on {info.device.type}, batch {cfg.batch_size} per process, "
             f"{len(data.train)} train / {len(data.val)} val images")
