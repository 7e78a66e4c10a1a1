"""run.py --task semantic end to end (vit_t, random weights, 128-pixel input, 4 + 2 synthetic
instance_map images whose label values 1 and 2 are the classes): 2-process validation equals
a single-process evaluation of best.pth, mid-epoch resume, the embedding cache's hit path,
bad labels stopped before any worker, and the predict tool's colour label PNG."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from segment_anything import sam_model_registry
from segment_anything.modeling.semantic_head import attach_head
from segment_anything.tools._semantic import palette, write_semantic
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import collate, load_records
from segment_anything.utils.save_weight import load_partial_weight
from segment_anything.utils.data.semantic import SemanticDataset
from segment_anything.utils.semantic_train import SemanticLoss, evaluate_semantic
from test_run import ENV, SEED, SIZE, base_flags, free_port, last_weights, max_diff, metrics, run_cmd, run_fails, run_ok

CLASSES = ["background", "1", "2"]
SEMANTIC = dict(task="semantic", data_format="instance_map", batch_size=2, epoch=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic_data")
    kw = dict(size_range=(64, 160), layout="image", kind="instance_map", objects=2)
    return make_synthetic_dataset(root / "train", n=4, seed=1, **kw), make_synthetic_dataset(root / "val", n=2, seed=2, **kw)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """1 process x batch 2, 2 epochs, no cache."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    run_ok(base_flags(*data, out, no_cache=True, dist="False", **SEMANTIC))
    return out


@pytest.fixture(scope="module")
def two_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two"
    run_ok(base_flags(*data, out, no_cache=True, world_size=2, port=free_port(), **SEMANTIC))
    return out


def evaluate_file(weights, val_dir) -> dict:
    """best.pth scored by one process over the whole validation set."""
    torch.manual_seed(SEED)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    attach_head(sam, len(CLASSES))
    load_partial_weight(sam, weights, expected_model_type="vit_t")
    dataset = SemanticDataset(load_records(val_dir, "instance_map"), SIZE, CLASSES)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    return evaluate_semantic(sam, loader, torch.device("cpu"), None, SemanticLoss({"ce": 1.0}), CLASSES)


def test_two_processes_report_the_single_process_evaluation_of_best_pth(data, two_process):
    meta = torch.load(two_process / "best.pth", weights_only=True)
    assert meta["task"] == "semantic" and meta["classes"] == CLASSES
    assert all(k.startswith("semantic_head.") for k in meta["model"])  # encoder frozen: only the head trained
    record = meta["metrics"]
    ours = evaluate_file(two_process / "best.pth", data[1])
    assert ours["images"] == 2
    for key in ["loss", "iou", "dice"] + [f"{m}_{c}" for m in ("iou", "dice") for c in CLASSES]:
        if ours[key] is None:
            assert record[f"val_{key}"] is None, key
        else:
            assert record[f"val_{key}"] == pytest.approx(ours[key], abs=1e-6), key
    first, last = metrics(two_process)[0], metrics(two_process)[-1]
    assert last["train_loss"] < first["train_loss"]  # it trains


def test_resume_mid_epoch_reproduces_the_straight_run(data, straight, tmp_path):
    out = tmp_path / "interrupted"
    args = base_flags(*data, out, no_cache=True, dist="False", save_every=1, **SEMANTIC)
    # 2 steps per epoch: saved after global step 2 (epoch 2's first), killed at step 3.
    proc = run_cmd([sys.executable, str(REPO / "run.py"), *args], env=dict(ENV, SAM_TEST_FAULT="exit:0:3"))
    assert proc.returncode != 0 and len(metrics(out)) == 1
    state = torch.load(out / "last.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1)
    run_ok(base_flags(*data, no_cache=True, dist="False", resume=out, **SEMANTIC))
    assert max_diff(last_weights(out), last_weights(straight)) <= 1e-6
    for a, b in zip(metrics(out), metrics(straight)):  # the resumed epoch's sums include its first step
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_iou_1"] == pytest.approx(b["val_iou_1"], abs=1e-6)


def test_frozen_encoder_trains_from_cached_embeddings(data, straight, tmp_path):
    out = tmp_path / "cached"
    run_ok(base_flags(*data, out, cache_dir=tmp_path / "cache", cache_dtype="fp32", dist="False", **SEMANTIC))
    first, second = metrics(out)
    assert (first["cache_hits"], first["cache_misses"]) == (0, 4)
    assert (second["cache_hits"], second["cache_misses"], second["val_cache_hits"]) == (4, 0, 2)
    # fp32 entries are the encoder's output itself: the same training as without the cache.
    assert max_diff(last_weights(out), last_weights(straight)) <= 1e-6


def test_label_value_beyond_num_classes_stops_before_any_worker(data, tmp_path):
    out = tmp_path / "bad"
    text = run_fails(base_flags(*data, out, num_classes=2, world_size=2, port=free_port(), **SEMANTIC))
    assert "label value 2 >= --num_classes 2" in text and str(data[0]) in text
    assert "world size 2" not in text and not out.exists()


def test_predict_writes_the_palette_colours_of_a_known_label_map(tmp_path):
    labels = np.zeros((6, 8), np.int64)
    labels[1:3, 1:4], labels[4:, 5:] = 1, 2
    image = np.full((6, 8, 3), 128, np.uint8)
    write_semantic(tmp_path, "x", image, labels, 3)
    colour = cv2.cvtColor(cv2.imread(str(tmp_path / "x_labels.png")), cv2.COLOR_BGR2RGB)
    colours = palette(3)
    assert colours[0].tolist() == [0, 0, 0] and len({tuple(c) for c in colours.tolist()}) == 3
    for c in range(3):
        assert (colour[labels == c] == colours[c]).all()
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "x_classes.png"), cv2.IMREAD_UNCHANGED), labels)


def test_predict_tool_on_a_semantic_best_pth(data, two_process, tmp_path):
    image = sorted((data[1] / "image").iterdir())[0]
    cmd = [sys.executable, "-m", "segment_anything.tools.predict", "--task", "semantic", "--model_type", "vit_t",
           "--checkpoint", "none", "--weights", str(two_process / "best.pth"), "--image", str(image), "--output", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    classes = cv2.imread(str(tmp_path / f"{image.stem}_classes.png"), cv2.IMREAD_UNCHANGED)
    colour = cv2.cvtColor(cv2.imread(str(tmp_path / f"{image.stem}_labels.png")), cv2.COLOR_BGR2RGB)
    assert classes.shape == cv2.imread(str(image)).shape[:2] and classes.max() < 3
    np.testing.assert_array_equal(colour, palette(3)[classes])
    no_weights = subprocess.run(cmd[:cmd.index("--weights")] + cmd[cmd.index("--image"):], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=300)
    assert no_weights.returncode != 0 and "--task semantic needs --weights" in no_weights.stderr
    prompt_mode = subprocess.run(cmd[:cmd.index("--task")] + cmd[cmd.index("--model_type"):] + ["--box", "1,1,20,20"],
                                 cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert prompt_mode.returncode != 0 and "is from a --task semantic run" in prompt_mode.stderr
