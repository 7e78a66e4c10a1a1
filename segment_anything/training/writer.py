"""What the user sees of a run: TensorBoard events, curves.png and samples.png (rank 0 only).

RunWriter writes TensorBoard event files into the run folder (per step: every loss term, IoU,
Dice, learning rate, images per second; per epoch: the metrics.jsonl record and a figure of a few
validation images). Without the tensorboard package it says so once and the run goes on.
curves.png (losses, validation IoU and Dice per epoch) is redrawn at every epoch end;
samples.png (validation images with ground truth, prediction and box prompt) whenever the
validation IoU improves, so at the end it shows the best epoch.
"""

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from ..utils.log import get_logger

N_SAMPLES = 4  # validation images shown


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[Dict], path: Path) -> None:
    """curves.png: train and validation loss, validation IoU and Dice, per epoch (metrics.jsonl records)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    def series(key):  # epoch 0 (the base model, --eval_base) has validation values only
        return [r["epoch"] for r in records if key in r], [r[key] for r in records if key in r]

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    left.plot(*series("train_loss"), "o-", label="train loss")
    left.plot(*series("val_loss"), "s-", label="val loss")
    right.plot(*series("val_iou"), "o-", label="val IoU")
    right.plot(*series("val_dice"), "s-", label="val Dice")
    right.set_ylim(0, 1)
    for ax, title in ((left, "loss"), (right, "validation")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def predict_samples(sam, dataset, count: int = N_SAMPLES) -> List[Dict]:
    """Box-prompted predictions for the first `count` items of a validation dataset, at the
    dataset's resized scale: dicts of image (h, w, 3) uint8, gt and pred (h, w) bool, boxes (N, 4)."""
    from ..predictor import SamPredictor

    was_training = {m: m.training for m in sam.modules()}
    sam.eval()
    predictor = SamPredictor(sam)
    out = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        image = item["image"].permute(1, 2, 0).numpy()
        h, w = image.shape[:2]
        scale = np.array([w, h, w, h], dtype=np.float32) / np.array(item["original_size"][::-1] * 2, dtype=np.float32)
        boxes = item["boxes"].numpy() * scale
        masks = torch.nn.functional.interpolate(item["masks"][None].float(), size=(h, w), mode="nearest")[0]
        predictor.set_image(image)
        pred = np.zeros((h, w), dtype=bool)
        for box in boxes:
            mask, _, _ = predictor.predict(box=box, multimask_output=False)
            pred |= mask[0]
        out.append({"image": image, "gt": masks.amax(0).bool().numpy(), "pred": pred, "boxes": boxes})
    for module, mode in was_training.items():
        module.train(mode)
    return out


def _overlay(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    shown = image.astype(np.float32).copy()
    shown[mask] = 0.55 * shown[mask] + 0.45 * np.array(colour, dtype=np.float32)
    return shown.astype(np.uint8)


def samples_figure(samples: List[Dict], title: str):
    """One row per image: input with the box prompt, ground truth (green), prediction (red)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(max(len(samples), 1), 3, figsize=(7.5, 2.6 * max(len(samples), 1)), dpi=100, squeeze=False)
    for row, s in zip(axes, samples):
        inter, union = (s["gt"] & s["pred"]).sum(), (s["gt"] | s["pred"]).sum()
        iou = inter / union if union else 1.0
        panels = ((s["image"], "image + box prompt"), (_overlay(s["image"], s["gt"], (0, 255, 0)), "ground truth"),
                  (_overlay(s["image"], s["pred"], (255, 0, 0)), f"prediction (IoU {iou:.2f})"))
        for ax, (picture, name) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
            for x0, y0, x1, y1 in s["boxes"]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
    for ax in axes.flat[3 * len(samples):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def device_label(device: torch.device) -> str:
    """'cuda:0 (NVIDIA A100-SXM4-80GB)', 'cpu', 'mps'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def figure_array(fig) -> np.ndarray:
    """Draw a figure once and close it: (H, W, 3) uint8 RGB, for a PNG file and TensorBoard alike."""
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _pyplot().close(fig)
    return picture


class RunWriter:
    """Rank 0's TensorBoard writer and pictures. Every method is cheap when tensorboard is absent."""

    def __init__(self, out_dir: Path, val_dataset, images_per_step: int, n_samples: int = N_SAMPLES) -> None:
        self.out_dir, self.val_dataset, self.images_per_step = Path(out_dir), val_dataset, images_per_step
        self.n_samples = n_samples
        metrics = self.out_dir / "metrics.jsonl"  # a resumed run's curves start at its first epoch; epoch 0 comes later
        self.records: List[Dict] = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        self.last_time: Optional[float] = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            get_logger().info("tensorboard is not installed: no event files (pip install tensorboard); training goes on")
            self.tb = None
        else:
            self.tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def step(self, global_step: int, terms: Dict[str, torch.Tensor], lr: float) -> None:
        """After an optimizer step: the step's loss terms and metrics (this rank's prompts), lr, images/s."""
        now = time.perf_counter()
        if self.tb is None:
            return
        names = sorted(terms)
        values = torch.stack([terms[k].detach().float().mean() for k in names]).tolist()  # one host sync
        for name, value in zip(names, values):
            self.tb.add_scalar(f"train_step/{name}", value, global_step)
        self.tb.add_scalar("train_step/lr", lr, global_step)
        if self.last_time is not None:
            self.tb.add_scalar("train_step/images_per_sec", self.images_per_step / max(now - self.last_time, 1e-9), global_step)
        self.last_time = now

    def epoch(self, record: Dict, sam, improved: bool) -> None:
        """After an epoch's metrics.jsonl line: epoch scalars, curves.png, sample figures."""
        self.records.append(record)
        self.last_time = None  # validation time is not training time
        plot_curves(self.records, self.out_dir / "curves.png")
        samples = predict_samples(sam, self.val_dataset, self.n_samples)
        picture = figure_array(samples_figure(samples, f"epoch {record['epoch']}: validation IoU {record['val_iou']:.3f}"))
        if improved:
            cv2.imwrite(str(self.out_dir / "samples.png"), picture[..., ::-1])
        if self.tb is not None:
            for key, value in record.items():  # every number of the metrics.jsonl line, loss terms included
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"epoch/{key}", value, record["epoch"])
            self.tb.add_image("validation_samples", picture, record["epoch"], dataformats="HWC")
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
