"""Tests for training/writer.py: curves.png, samples.png and TensorBoard events (rank 0's writer)."""

import builtins
import logging

import cv2
import numpy as np
import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.tools.synthetic_data import make_synthetic_dataset
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.log import LOGGER_NAME
from segment_anything.training.writer import RunWriter, figure_array, plot_curves, predict_samples, samples_figure

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
    assert len(samples) == 2
    for s, i in zip(samples, range(2)):
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
        "tensorboard is not installed: no event files (pip install tensorboard); training goes on"]
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "samples.png").exists()  # only written when the validation IoU improves
