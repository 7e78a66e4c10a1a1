"""Tests for training/writer.py: curves.png, samples.png and TensorBoard events (rank 0's writer)."""

import builtins
import copy
import json
import logging

import cv2
import numpy as np
import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.log import LOGGER_NAME
from segment_anything.training.writer import (RunWriter, figure_array, plot_curves, predict_samples, sample_indices,
                                              samples_figure)

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("vis") / "val", n=3, size_range=(40, 90), seed=7)
    return MaskDataset(load_records(root), SIZE)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE).eval()


RECORDS = [{"epoch": e, "train_loss": 1.5 - 0.1 * e, "val_loss": 1.4 - 0.1 * e, "val_iou": 0.2 * e, "val_dice": 0.25 * e,
            "train_iou": 0.1, "lr": 1e-4, "images_per_sec": 3.0, "skipped_steps": 0} for e in (1, 2, 3)]


def assert_picture(path, width, height):
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape[:2] == (height, width)
    assert picture.std() > 20 and (picture < 250).mean() > 0.02, "blank picture"  # more than a white page


def test_curves_png(tmp_path):
    base = {"epoch": 0, "val_loss": 1.5, "val_iou": 0.1, "val_dice": 0.15}  # --eval_base: validation only
    plot_curves([base] + RECORDS, tmp_path / "curves.png")
    assert_picture(tmp_path / "curves.png", 900, 340)


def test_samples_show_image_ground_truth_and_prediction(sam, val_set):
    samples = predict_samples(sam, val_set, count=2)
    assert len(samples) == 2 and sample_indices(val_set, 2) == [0, 2]  # spread over the set
    for s, i in zip(samples, (0, 2)):
        h, w = val_set[i]["input_size"]
        assert s["image"].shape == (h, w, 3) and s["gt"].shape == s["pred"].shape == (h, w)
        assert s["gt"].any() and s["boxes"].shape == (1, 4) and (s["boxes"][0, 2:] <= [w, h]).all()
    picture = figure_array(samples_figure(samples, "t"))
    assert picture.shape == (2 * 260, 750, 3) and picture.std() > 20
    assert all(m.training is False for m in sam.modules())


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_run_writer_writes_scalars_images_and_pictures(tmp_path, sam, val_set):
    writer = RunWriter(tmp_path, val_set, images_per_step=2, n_samples=1)
    terms = {"total": torch.tensor([1.0, 2.0]), "real_iou": torch.tensor([0.5, 0.7]), "dice": torch.tensor([0.6, 0.8])}
    for step in range(3):
        writer.step(step, terms, lr=1e-4)
    writer.epoch(RECORDS[0], sam, improved=True)
    writer.close()
    tags = read_events(tmp_path / "tensorboard")
    for tag in ("train_step/total", "train_step/real_iou", "train_step/dice", "train_step/lr", "train_step/images_per_sec",
                "epoch/train_loss", "epoch/val_loss", "epoch/val_iou", "epoch/val_dice", "epoch/lr", "epoch/images_per_sec"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert "validation_samples" in tags["images"]
    assert_picture(tmp_path / "curves.png", 900, 340)
    assert_picture(tmp_path / "samples.png", 750, 260)


def test_without_tensorboard_one_line_and_training_goes_on(tmp_path, sam, val_set, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    # A handler of our own on the project's logger: counts exactly what the code logs, whatever
    # handlers earlier tests left on the root logger.
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(LOGGER_NAME)
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    try:
        writer = RunWriter(tmp_path, val_set, images_per_step=1, n_samples=0)
        writer.step(0, {"total": torch.ones(1)}, lr=1.0)
        writer.epoch(RECORDS[0], sam, improved=False)
        writer.close()
    finally:
        logger.removeHandler(handler)
    assert [m for m in messages if "tensorboard" in m] == [
        "tensorboard is not installed: no event files (the train extra: pip install -e \".[train]\"); training goes on"]
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "samples.png").exists()  # only written when the validation IoU improves


# ----------------------------------------------------------------------------- curves.png


def curve_axes(records):
    from segment_anything.training.writer import curves_figure

    fig = curves_figure(records)
    axes = fig.axes
    data = {line.get_label(): list(line.get_xdata()) for ax in axes for line in ax.get_lines()}
    return fig, axes, data


def test_one_epoch_curves_start_at_epoch_0_with_integer_ticks():
    base = {"epoch": 0, "val_loss": 1.5, "val_iou": 0.1, "val_dice": 0.15}
    fig, axes, data = curve_axes([base, RECORDS[0]])
    assert data["val IoU"] == [0, 1] and data["val loss"] == [0, 1] and data["train loss"] == [1]
    for ax in axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert lo < 0 and hi > 1 and hi - lo < 2, (lo, hi)  # both epochs inside, not 0.945..1.05
        assert ticks == [0, 1], ticks
    fig.clf()


def test_fresh_run_curves_include_epoch_0(tmp_path, monkeypatch, sam, val_set):
    """The engine writes epoch 0 (the base model) to metrics.jsonl after the writer exists."""
    from segment_anything.training import writer as writer_module

    drawn = []
    monkeypatch.setattr(writer_module, "plot_curves", lambda records, path: drawn.append([r["epoch"] for r in records]))
    writer = RunWriter(tmp_path, val_set, images_per_step=1, n_samples=0)
    base = {"epoch": 0, "val_loss": 1.5, "val_iou": 0.1, "val_dice": 0.15}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(base) + "\n")
    for record in RECORDS[:2]:
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer.epoch(record, sam, improved=False)
    writer.close()
    assert drawn == [[0, 1], [0, 1, 2]]


# ----------------------------------------------------------------------------- samples.png


@pytest.fixture(scope="module")
def crowded_val_set(tmp_path_factory):
    """Three images of five objects each, validated in chunks of two: three items per image."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("crowd") / "val", n=3, size_range=(48, 64), seed=5, objects=5)
    return MaskDataset(load_records(root), SIZE, max_objects=2, train=False)


def test_samples_are_different_images_and_say_how_many_objects(sam, crowded_val_set):
    samples = predict_samples(sam, crowded_val_set, count=2)
    assert len({s["path"] for s in samples}) == 2
    assert [(s["drawn"], s["objects"]) for s in samples] == [(2, 5), (2, 5)]
    fig = samples_figure(samples, "epoch 1")
    title = fig._suptitle.get_text()
    assert "2 of 3 validation images" in title and "4 of 10 of their objects" in title, title
    assert "2 of 5 objects" in fig.axes[2].get_title()
    figure_array(fig)


def semantic_set(tmp_path):
    from segment_anything.utils.data.semantic import SemanticDataset, class_names

    root = make_synthetic_dataset(tmp_path / "sem", n=2, size_range=(48, 64), seed=9, objects=3)
    records = load_records(root)
    return SemanticDataset(records, SIZE, class_names(records))


def test_semantic_samples_draw_class_maps(tmp_path, sam):
    from segment_anything.modeling.semantic_head import attach_head

    dataset = semantic_set(tmp_path)
    model = copy.deepcopy(sam)
    attach_head(model, 2)
    model.eval()
    (tmp_path / "run").mkdir()
    writer = RunWriter(tmp_path / "run", dataset, images_per_step=1)
    writer.epoch(RECORDS[0], model, improved=True)
    writer.close()
    assert_picture(tmp_path / "run" / "samples.png", 750, 2 * 260)
    from segment_anything.training.writer import predict_class_maps

    (first, _) = predict_class_maps(model, dataset, 2)
    item = dataset[0]
    h, w = item["input_size"]
    assert first["gt"].shape == first["pred"].shape == (h, w) and set(np.unique(first["gt"])) == {0, 1}
    assert first["pred"].max() < 2


def test_no_samples_no_blank_picture(tmp_path, sam, val_set):
    writer = RunWriter(tmp_path, val_set, images_per_step=1, n_samples=0)
    writer.epoch(RECORDS[0], sam, improved=True)
    writer.close()
    assert not (tmp_path / "samples.png").exists()
