"""What the user sees of a run: TensorBoard events, curves.png and samples.png (rank 0 only).

RunWriter writes TensorBoard event files into the run folder (per step: every loss term, IoU,
Dice, learning rate, images per second; per epoch: the metrics.jsonl record and a figure of a few
validation images). Without the tensorboard package it says so once and the run goes on.
curves.png (losses, validation IoU and Dice per epoch, from metrics.jsonl, so epoch 0 - the base
model - is in it whether the run is fresh or resumed) is redrawn at every epoch end. samples.png
is redrawn whenever the validation IoU improves, so at the end it shows the best epoch: a few
different validation images spread over the set, each with ground truth and prediction side by
side (box-prompted masks, or class maps with --task semantic), the title saying how many images
and objects it shows of how many. No samples, no samples.png: never a picture with a title only.
"""

import io
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from ..predictor import SamPredictor
from ..utils.draw import overlay
from ..utils.log import get_logger
from ..utils.save_weight import atomic_write_bytes

N_SAMPLES = 4  # validation images shown


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    return plt


def curves_figure(records: Sequence[Dict]):
    """Train and validation loss, validation IoU and Dice per epoch (metrics.jsonl records), on
    an axis of whole epochs from 0, so a one-epoch run shows its base and its one epoch."""
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
    last = max([r["epoch"] for r in records] + [1])
    margin = max(0.25, 0.03 * last)
    for ax, title in ((left, "loss"), (right, "validation")):
        ax.set_xlabel("epoch")
        ax.set_xlim(-margin, last + margin)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(records: Sequence[Dict], path: Path) -> None:
    """curves.png from metrics.jsonl records, replaced whole or not at all (WriteError)."""
    fig = curves_figure(records)
    data = io.BytesIO()
    fig.savefig(data, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(data.getvalue(), path)


def read_records(metrics: Path) -> List[Dict]:
    """metrics.jsonl records by epoch (the last line of an epoch wins: a run stopped between its
    metrics line and last.pth repeats that epoch when resumed); a torn last line is left out."""
    by_epoch: Dict[int, Dict] = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def sample_indices(dataset, count: int) -> List[int]:
    """Dataset positions of `count` different images spread evenly over the set: for a chunked
    validation set (MaskDataset), the first chunk of each; else one item per image."""
    chunks = getattr(dataset, "chunks", None)
    firsts = [k for k, (_, start) in enumerate(chunks) if start == 0] if chunks is not None else list(range(len(dataset)))
    if count <= 0 or not firsts:
        return []
    if len(firsts) <= count:
        return firsts
    step = (len(firsts) - 1) / max(count - 1, 1)
    return [firsts[round(i * step)] for i in range(count)]


def _num_images(dataset) -> int:
    return len(dataset.records) if hasattr(dataset, "records") else len(dataset)


class _EvalMode:
    """Eval mode for the pictures, each module's own mode back afterwards (a frozen TinyViT stays in eval)."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, mode in self.modes.items():
            module.train(mode)


@torch.no_grad()
def predict_samples(sam, dataset, count: int = N_SAMPLES) -> List[Dict]:
    """Box-prompted predictions for `count` different validation images (sample_indices), at the
    dataset's resized scale: dicts of image (h, w, 3) uint8, gt and pred (h, w) bool, boxes (N, 4),
    path, drawn (N: the objects of the image's first item, at most --max_objects) of objects (all
    of the image's objects), and images (the validation images in all)."""
    out = []
    with _EvalMode(sam):
        predictor = SamPredictor(sam)
        for i in sample_indices(dataset, count):
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
            records = getattr(dataset, "records", None)
            total = records[item["index"]].num_objects if records is not None else len(boxes)
            out.append({"image": image, "gt": masks.amax(0).bool().numpy(), "pred": pred, "boxes": boxes,
                        "path": item["path"], "drawn": len(boxes), "objects": total, "images": _num_images(dataset)})
    return out


@torch.no_grad()
def predict_class_maps(sam, dataset, count: int = N_SAMPLES) -> List[Dict]:
    """--task semantic: class maps for `count` different validation images of a SemanticDataset,
    at its resized scale: dicts of image (h, w, 3) uint8, gt and pred (h, w) int64 class ids,
    classes (names, index = id), path, images (the validation images in all)."""
    classes = sorted(dataset.class_ids, key=dataset.class_ids.get)
    device = next(sam.parameters()).device
    out = []
    with _EvalMode(sam):
        for i in sample_indices(dataset, count):
            item = dataset[i]
            h, w = item["input_size"]
            x = sam.preprocess(item["image"].to(device).float())[None]
            pred = sam.semantic_head(sam.image_encoder(x))[0, :, :h, :w].argmax(0).cpu().numpy()
            gt = torch.nn.functional.interpolate(item["target"][None, None].float(), size=(h, w), mode="nearest")[0, 0]
            out.append({"image": item["image"].permute(1, 2, 0).numpy(), "gt": gt.long().numpy(), "pred": pred,
                        "classes": classes, "path": item["path"], "images": _num_images(dataset)})
    return out


def samples_figure(samples: List[Dict], title: str):
    """One row per image: input with the box prompts, ground truth (green), prediction (red); the
    title says how many images and objects are drawn of how many."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(max(len(samples), 1), 3, figsize=(7.5, 2.6 * max(len(samples), 1)), dpi=100, squeeze=False)
    for row, s in zip(axes, samples):
        inter, union = (s["gt"] & s["pred"]).sum(), (s["gt"] | s["pred"]).sum()
        iou = inter / union if union else 1.0
        panels = ((s["image"], "image + box prompts"), (overlay(s["image"], [s["gt"]], [(0, 255, 0)], outline=False), "ground truth"),
                  (overlay(s["image"], [s["pred"]], [(255, 0, 0)], outline=False),
                   f"prediction (IoU {iou:.2f}, {s['drawn']} of {s['objects']} objects)"))
        for ax, (picture, name) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
            for x0, y0, x1, y1 in s["boxes"]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
    for ax in axes.flat[3 * len(samples):]:
        ax.axis("off")
    if samples:
        title += (f"\n{len(samples)} of {samples[0]['images']} validation images, {sum(s['drawn'] for s in samples)} of "
                  f"{sum(s['objects'] for s in samples)} of their objects drawn")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def class_colours(k: int) -> np.ndarray:
    """(K, 3) uint8 RGB: background (class 0) black, the classes from matplotlib's tab10 from its
    orange on (its blue first would hide among blue-ish images), then tab20b's colours."""
    plt = _pyplot()
    table = [plt.get_cmap("tab10")(i) for i in range(1, 10)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return np.array([(0, 0, 0)] + [tuple(int(255 * v) for v in table[c % len(table)][:3]) for c in range(k - 1)], np.uint8)


def _paint(image: np.ndarray, classes: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """A class map over the image: the image dimmed to grey, each class in its colour."""
    grey = image.astype(np.float32).mean(2, keepdims=True) * 0.6
    shown = np.repeat(grey, 3, 2)
    fg = classes > 0
    shown[fg] = 0.25 * shown[fg] + 0.75 * colours[classes[fg]].astype(np.float32)
    return shown.astype(np.uint8)


def class_maps_figure(samples: List[Dict], title: str):
    """--task semantic, one row per image: input, ground-truth class map, predicted class map
    (class colours over the image, a legend of the classes shown)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(max(len(samples), 1), 3, figsize=(7.5, 2.6 * max(len(samples), 1)), dpi=100, squeeze=False)
    shown = set()
    for row, s in zip(axes, samples):
        colours = class_colours(len(s["classes"]))
        present = [c for c in range(1, len(s["classes"])) if (s["gt"] == c).any() or (s["pred"] == c).any()]
        ious = [((s["gt"] == c) & (s["pred"] == c)).sum() / ((s["gt"] == c) | (s["pred"] == c)).sum() for c in present]
        score = f"IoU {np.mean(ious):.2f} without background" if ious else "background only"
        panels = ((s["image"], "image"), (_paint(s["image"], s["gt"], colours), "ground truth"),
                  (_paint(s["image"], s["pred"], colours), f"prediction ({score})"))
        for ax, (picture, name) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        shown.update(present)
    for ax in axes.flat[3 * len(samples):]:
        ax.axis("off")
    if samples:
        names, colours = samples[0]["classes"], class_colours(len(samples[0]["classes"]))
        handles = [Patch(color=colours[c] / 255, label=names[c]) for c in sorted(shown)[:12]]
        if handles:
            axes[0, 0].legend(handles=handles, loc="upper left", fontsize=7, framealpha=0.8)
        title += f"\n{len(samples)} of {samples[0]['images']} validation images, {len(names)} classes ({', '.join(names[:6])}" \
                 + (", ...)" if len(names) > 6 else ")")
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

    def __init__(self, out_dir: Path, val_dataset, images_per_step: float, n_samples: int = N_SAMPLES) -> None:
        self.out_dir, self.val_dataset, self.images_per_step = Path(out_dir), val_dataset, images_per_step
        self.n_samples = n_samples
        self.last_time: Optional[float] = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            get_logger().info("tensorboard is not installed: no event files (the train extra: pip install -e \".[train]\"); training goes on")
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
        self.last_time = None  # validation time is not training time
        records = [r for r in read_records(self.out_dir / "metrics.jsonl") if r["epoch"] != record["epoch"]]
        plot_curves(sorted(records + [record], key=lambda r: r["epoch"]), self.out_dir / "curves.png")
        picture = self.samples_picture(record, sam)
        if improved and picture is not None:
            atomic_write_bytes(cv2.imencode(".png", picture[..., ::-1])[1].tobytes(), self.out_dir / "samples.png")
        if self.tb is not None:
            for key, value in record.items():  # every number of the metrics.jsonl line, loss terms included
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"epoch/{key}", value, record["epoch"])
            if picture is not None:
                self.tb.add_image("validation_samples", picture, record["epoch"], dataformats="HWC")
            self.tb.flush()

    def samples_picture(self, record: Dict, sam) -> Optional[np.ndarray]:
        """The samples figure as (H, W, 3) RGB, or None when there is nothing to draw."""
        title = f"epoch {record['epoch']}: validation IoU {record['val_iou']:.3f}"
        if hasattr(self.val_dataset, "class_ids"):  # --task semantic
            samples = predict_class_maps(sam, self.val_dataset, self.n_samples)
            return figure_array(class_maps_figure(samples, title)) if samples else None
        samples = predict_samples(sam, self.val_dataset, self.n_samples)
        return figure_array(samples_figure(samples, title)) if samples else None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
