"""A run resumed on another number of processes continues exactly when the global batch is kept:
4 spawned gloo processes x batch 2 lose a rank mid-epoch (SAM_TEST_FAULT exit), resume as 2 x batch 2
with --accumulate 2 chosen by the resume itself, and end where the uninterrupted 4-process run and
1 process x batch 8 end. vit_t, random weights, 64 px, one thread per process."""

import sys

import pytest
import torch

from conftest import REPO
from segment_anything.utils.data import make_synthetic_dataset
from test_run import ENV, assert_synchronised, free_port, last_weights, metrics, output, run_cmd

# 16 training images, global batch 8: 2 steps per epoch, 2 epochs.
FLAGS = {"checkpoint": "none", "image_size": 64, "num_workers": 0, "model_type": "vit_t", "epoch": 2, "seed": 5,
         "save_every": 1, "eval_base": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    train = make_synthetic_dataset(root / "train", n=16, size_range=(48, 64), seed=11)
    val = make_synthetic_dataset(root / "val", n=2, size_range=(48, 64), seed=12)
    return train, val


def run_py(args: list, env: dict = ENV):
    return run_cmd([sys.executable, str(REPO / "run.py"), *args], env=env)


def flags(data, out, **extra) -> list:
    values = dict(FLAGS, train_dir=data[0], val_dir=data[1], output_dir=out, port=free_port(), **extra)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def test_four_processes_resumed_as_two_with_accumulation_end_with_the_uninterrupted_weights(data, tmp_path):
    straight, one, killed = tmp_path / "p4_b2", tmp_path / "p1_b8", tmp_path / "killed"
    proc = run_py(flags(data, straight, world_size=4, batch_size=2))
    assert proc.returncode == 0, output(proc)
    proc = run_py(flags(data, one, world_size=1, batch_size=8))
    assert proc.returncode == 0, output(proc)
    # Rank 1 dies at global step 3, the second step of epoch 2; last.pth then holds step 1 of it.
    proc = run_py(flags(data, killed, world_size=4, batch_size=2), env=dict(ENV, SAM_TEST_FAULT="exit:1:3"))
    assert proc.returncode != 0, output(proc)
    saved = torch.load(killed / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["world_size"]) == (1, 1, 4)

    # 3 processes x batch 2 cannot make a global batch of 8: refused before any worker starts.
    refused = run_py(["--resume", str(killed), "--world_size", "3"])
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, output(refused)
    assert "no whole --accumulate keeps that global batch" in refused.stderr
    assert "world size of 1, 2, 4" in refused.stderr and "--resume_relaxed" in refused.stderr

    proc = run_py(["--resume", str(killed), "--world_size", "2"])  # no --resume_relaxed
    assert proc.returncode == 0, output(proc)
    log = (killed / "train.log").read_text()
    assert "--accumulate 2 keeps its global batch of 8 (2 x batch 2 x 2), so it continues exactly" in log, log[-3000:]
    assert "resumed from" in log and "at epoch 2, step 1" in log and "NOT reproduced" not in log
    assert "2 process(es) on cpu" in log
    resumed = torch.load(killed / "last.pth", weights_only=True)
    assert (resumed["epoch"], resumed["world_size"], resumed["accumulate"]) == (2, 2, 2)

    four = last_weights(straight)
    assert_synchronised(four, last_weights(killed))
    assert_synchronised(four, last_weights(one))
    # The epoch's metrics cover all of it: the 4 ranks' partial sums carried over to the 2 new ones.
    records = metrics(killed)
    assert [m["epoch"] for m in records] == [m["epoch"] for m in metrics(straight)] == [1, 2]
    for a, b in zip(records, metrics(straight)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_iou"] == pytest.approx(b["train_iou"], rel=1e-4)
