"""End-to-end fault tests of run.py (2 spawned gloo processes, vit_t, random weights, 64 px):
SIGKILL mid-epoch and resume, SIGTERM, a NaN on one rank, a rank that hangs. Each subprocess has
a timeout, so a hang fails the test instead of blocking pytest."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import pytest
import torch

from conftest import REPO
from segment_anything.utils.data import make_synthetic_dataset
from test_run import ENV, TIMEOUT, free_port, max_diff, metrics, output, run_cmd

# 8 training images, batch 1 on 2 ranks: 4 steps per epoch; 1 validation image: rank 1's
# validation shard is empty.
FLAGS = {"checkpoint": "none", "image_size": 64, "num_workers": 0, "model_type": "vit_t", "world_size": 2,
         "batch_size": 1, "epoch": 2, "seed": 5, "save_every": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    train = make_synthetic_dataset(root / "train", n=8, size_range=(48, 80), seed=1)
    val = make_synthetic_dataset(root / "val", n=1, size_range=(48, 80), seed=2)
    return train, val


def flags(data, out, **extra) -> list:
    values = dict(FLAGS, train_dir=data[0], val_dir=data[1], output_dir=out, port=free_port(), **extra)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def run_py(args: list, env: dict = ENV) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(REPO / "run.py"), *args], env=env)


def state(out):
    return torch.load(out / "last.pth", map_location="cpu", weights_only=True)


def interrupt_mid_epoch(args: list, out, sig: int):
    """Start a run in its own session; once last.pth shows a step inside epoch 1, send sig to the
    whole process group (launcher and workers), as a scheduler would. Returns (process, state seen)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    seen = None
    try:
        while seen is None:
            assert proc.poll() is None, f"run ended before it could be interrupted:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint in time"
            if (out / "last.pth").exists():  # an atomic rename: complete once it is there
                s = state(out)
                seen = s if (s["epoch"], s["step"]) >= (0, 2) and s["step"] > 0 else None
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        text, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc, seen, text


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run_py(flags(data, out))
    assert proc.returncode == 0, output(proc)
    return out


def test_a_run_shows_what_it_does(straight):
    """The run's first lines, TensorBoard events and pictures (also: validation with an empty shard on rank 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    head = (straight / "train.log").read_text().splitlines()[:8]
    assert any("train: " in line and "8 images" in line for line in head), head
    assert any(f"world size 2: rank 0 cpu, rank 1 cpu | run folder {straight}" in line for line in head)
    for name, shape in (("curves.png", (340, 900, 3)), ("samples.png", (260, 750, 3))):  # 1 validation image
        picture = cv2.imread(str(straight / name))
        assert picture.shape == shape and picture.std() > 20, name
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train_step/loss", "train_step/loss_bce", "train_step/iou", "train_step/dice", "train_step/lr",
            "train_step/images_per_sec", "epoch/val_iou", "epoch/val_dice", "epoch/train_loss_bce"} <= set(tags["scalars"])
    assert tags["images"] == ["validation_samples"]


def global_step(s) -> int:
    return s["epoch"] * s["steps_per_epoch"] + s["step"]


def test_sigkill_mid_epoch_then_resume_alone_ends_with_the_straight_runs_weights(data, straight, tmp_path):
    out = tmp_path / "killed"
    proc, seen, _ = interrupt_mid_epoch(flags(data, out), out, signal.SIGKILL)
    after = state(out)
    assert proc.returncode == -signal.SIGKILL and global_step(after) >= global_step(seen)
    # --resume RUN alone: the run's own flags (64 px, random weights) from its args.json.
    resumed = run_cmd([sys.executable, str(REPO / "run.py"), "--resume", str(out)])
    assert resumed.returncode == 0, output(resumed)
    log = (out / "train.log").read_text()
    assert f"at epoch {after['epoch'] + 1}, step {after['step']}" in log
    diff = max_diff(state(out)["model"], state(straight)["model"])
    assert diff <= 1e-6, f"killed and resumed run differs from the straight run by {diff:.3g}"
    for a, b in zip(metrics(out), metrics(straight)):
        assert a["epoch"] == b["epoch"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        if a["epoch"] > 0:  # epoch 0 is the base model: validation only
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert [m["epoch"] for m in metrics(out)] == [0, 1, 2]  # epoch 0: the base model (--eval_base)


def test_sigterm_saves_last_pth_and_says_how_to_resume(data, tmp_path):
    out = tmp_path / "term"
    proc, seen, text = interrupt_mid_epoch(flags(data, out), out, signal.SIGTERM)
    assert proc.returncode != 0, text
    after = state(out)
    # Saved at the stop: later than the state seen when the signal was sent. The stop can fall on
    # an epoch boundary on a fast machine, so the step within the epoch may be 0.
    assert global_step(after) > global_step(seen)
    log = (out / "train.log").read_text()
    assert "stopped by SIGTERM" in log and f"{sys.executable} {REPO / 'run.py'} --resume {out}" in log  # as launched


def test_nan_on_one_rank_is_skipped_counted_and_too_many_stop_the_run(data, tmp_path):
    out = tmp_path / "nan"
    # Rank 1's gradients are NaN at global step 1, then from step 5 on (epoch 2, its 2nd step).
    env = dict(ENV, SAM_TEST_FAULT="nan:1:1,nan:1:5+")
    proc = run_py(flags(data, out, max_bad_steps=2), env=env)
    assert proc.returncode == 1, output(proc)
    record = [m for m in metrics(out) if m["epoch"] > 0]
    assert len(record) == 1 and record[0]["skipped_steps"] == 1
    log = (out / "train.log").read_text()
    assert "non-finite loss or gradient at step 1: optimizer step skipped on every rank" in log
    assert "3 optimizer steps in a row had a non-finite loss or gradient (more than --max_bad_steps 2)" in log
    last = state(out)
    assert (last["epoch"], last["step"], last["bad_steps"]) == (1, 4, 3)
    assert all(v.isfinite().all() for v in last["model"].values())


def test_a_hung_rank_makes_the_others_stop_naming_it(data, tmp_path):
    out = tmp_path / "hang"
    proc = run_py(flags(data, out, dist_timeout=3), env=dict(ENV, SAM_TEST_FAULT="hang:1:3"))
    assert proc.returncode != 0, output(proc)
    log = (out / "train.log").read_text()
    assert "rank 1 (last at step 2) died or stopped responding while the others reached step 3" in log, log[-2000:]


def test_a_lost_peer_after_this_rank_got_a_signal_is_a_stop_not_an_error(caplog):
    """Ctrl-C reaches every rank; one still starting up stops at once, so the others' next
    collective fails: that rank ends with the signal's code and a warning, not 'a rank died'."""
    import signal
    from types import SimpleNamespace

    import torch.distributed as dist

    from segment_anything.training.faults import faults_to_exit
    from segment_anything.utils.distributed import DistInfo

    guard = SimpleNamespace(signal_name="SIGINT")
    with pytest.raises(SystemExit) as stopped, caplog.at_level("WARNING"):
        with faults_to_exit(DistInfo(rank=1, world_size=2), guard):
            raise dist.DistError("Connection closed by peer")
    assert stopped.value.code == 128 + signal.SIGINT
    assert "rank 1: stopped by SIGINT; another rank stopped before training started" in caplog.text
    guard.signal_name = None  # no signal here: a lost peer is an error naming the failure
    with pytest.raises(SystemExit) as failed, caplog.at_level("ERROR"):
        with faults_to_exit(DistInfo(rank=1, world_size=2), guard):
            raise dist.DistError("Connection closed by peer")
    assert failed.value.code == 1 and "a collective operation failed" in caplog.text
