"""Tiled training end to end (run.py, 2 spawned gloo processes, vit_t, random weights, 64 px): an
instance-map data set of 88-104 px images with 6 objects each, cut into 48 px tiles, mixed prompts
and the embedding cache; killed mid-epoch and resumed, it ends with the straight run's weights."""

import json
import signal
import sys

import pytest
from conftest import REPO

from segment_anything.utils.data import make_synthetic_dataset
from test_faults import global_step, interrupt_mid_epoch, state
from test_run import free_port, max_diff, metrics, output, run_cmd

# 3 training images -> 18 tiles with an object to train: 9 steps per epoch on 2 ranks.
FLAGS = {"checkpoint": "none", "image_size": 64, "num_workers": 0, "model_type": "vit_t", "world_size": 2,
         "batch_size": 1, "epoch": 2, "seed": 5, "save_every": 1, "data_format": "instance_map",
         "tile": 48, "tile_overlap": 8, "prompt": "mixed", "num_points": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    make = dict(size_range=(88, 104), layout="image", kind="instance_map", objects=6)
    return make_synthetic_dataset(root / "train", n=3, seed=1, **make), make_synthetic_dataset(root / "val", n=1, seed=2, **make)


def flags(data, out) -> list:
    values = dict(FLAGS, train_dir=data[0], val_dir=data[1], output_dir=out, port=free_port())
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run_cmd([sys.executable, str(REPO / "run.py"), *flags(data, out)])
    assert proc.returncode == 0, output(proc)
    return out


def test_tiled_run_logs_its_tiles_and_reads_them_from_the_cache(straight):
    log = (straight / "train.log").read_text()
    assert "tiles of 48 px, overlap 8" in log
    assert "train: 3 images (3 larger than a tile) -> 18 tiles, 6-6 per image" in log
    assert "objects per tile 1-1 (mean 1.0)" in log and "18 train / 5 val tiles" in log
    last = metrics(straight)[-1]  # every tile its own cache entry: all hits in the second epoch
    assert (last["cache_hits"], last["cache_misses"], last["val_cache_hits"]) == (18, 0, 5)
    assert json.loads((straight / "args.json").read_text())["tile"] == 48


def test_tiled_run_killed_mid_epoch_resumes_exactly(data, straight, tmp_path):
    out = tmp_path / "killed"
    proc, seen, _ = interrupt_mid_epoch(flags(data, out), out, signal.SIGKILL)
    after = state(out)
    assert proc.returncode == -signal.SIGKILL and global_step(after) >= global_step(seen)
    assert after["steps_per_epoch"] == 9  # tiles, not images, are the items
    resumed = run_cmd([sys.executable, str(REPO / "run.py"), "--resume", str(out)])
    assert resumed.returncode == 0, output(resumed)
    assert f"at epoch {after['epoch'] + 1}, step {after['step']}" in (out / "train.log").read_text()
    diff = max_diff(state(out)["model"], state(straight)["model"])
    assert diff <= 1e-6, f"killed and resumed tiled run differs from the straight run by {diff:.3g}"
    for a, b in zip(metrics(out), metrics(straight)):
        assert a["epoch"] == b["epoch"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        if a["epoch"] > 0:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
