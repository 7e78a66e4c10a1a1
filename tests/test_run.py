"""End-to-end tests of run.py in subprocesses: 1 process, 2 spawned gloo processes, torchrun.

Every run is vit_t with random weights (--checkpoint none) at a 128-pixel encoder input on a few
small synthetic images, so a run takes seconds. Subprocesses get a timeout, so a hang in a
process group fails the test instead of blocking pytest, and a fresh port for every group.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, require_shared_data
from segment_anything import sam_model_registry
from segment_anything.utils.data import make_synthetic_dataset

SIZE = 128
SEED = 21
TIMEOUT = 300
SYNC_TOL = 1e-5
# One thread per process: tiny tensors gain nothing from a second one, and on a shared 2-core
# machine every parallel region would wait for the busy core. run.py sets 1 per rank itself.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_flags(train: Path, val: Path, out: Path = None, **extra) -> list:
    # eval_base off: these runs compare training epochs; the epoch-0 record is tested on nails below.
    flags = {"checkpoint": "none", "image_size": SIZE, "num_workers": 0, "train_dir": train, "val_dir": val,
             "seed": SEED, "model_type": "vit_t", "eval_base": False, **extra}
    if out is not None:
        flags["output_dir"] = out
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def run_cmd(cmd: list, env: dict = ENV) -> subprocess.CompletedProcess:
    """Run cmd in its own session; on timeout kill the whole group, workers it spawned included."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(cmd)}\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun_cmd(script: str, args: list, nproc: int = 2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), script, *args]


def run(args: list, torchrun: bool = False) -> subprocess.CompletedProcess:
    return run_cmd(torchrun_cmd("run.py", args) if torchrun else [sys.executable, str(REPO / "run.py"), *args])


def output(proc) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def run_ok(args: list, **kw) -> subprocess.CompletedProcess:
    proc = run(args, **kw)
    assert proc.returncode == 0, output(proc)
    return proc


def run_fails(args: list, **kw) -> str:
    proc = run(args, **kw)
    assert proc.returncode != 0, output(proc)
    return proc.stdout + proc.stderr


def last_weights(run_dir: Path) -> dict:
    state = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    return state["model"]


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def initial_decoder(like: dict) -> dict:
    """The trained tensors (the keys of like) as fit() starts them: it seeds torch with --seed,
    then builds the model."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    return {k: v for k, v in sam.state_dict().items() if k in like}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 training images (a known set: validation comes from its own folder) and 2 validation images.
    With 4 images, 1 x batch 4 and 2 x batch 2 both make one step per epoch on the same global batch."""
    root = tmp_path_factory.mktemp("data")
    train = make_synthetic_dataset(root / "train", n=4, size_range=(64, 160), seed=1)
    val = make_synthetic_dataset(root / "val", n=2, size_range=(64, 160), seed=2)
    return train, val


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """1 process x batch 4, 2 epochs."""
    out = tmp_path_factory.mktemp("runs") / "p1_b4"
    run_ok(base_flags(*data, out, batch_size=4, epoch=2, dist="False"))
    return out


# ----------------------------------------------------------------------------- a. gradient sync

# The key projections' biases get a gradient that is exactly zero in exact arithmetic (a bias
# added to every key shifts each query's logits by a constant, which softmax ignores), so they
# receive rounding noise only, which Adam scales up to steps of up to the learning rate. Even one
# process on 1 vs 2 threads ends ~1.5e-5 apart on them; every other tensor agrees to ~5e-6.
NOISE_ONLY = "k_proj.bias"


def assert_synchronised(one: dict, two: dict, outliers: int = 0) -> None:
    """outliers: how many single weights (outside NOISE_ONLY) may differ by more than SYNC_TOL,
    up to 10 x SYNC_TOL. Other weights whose gradient is near zero get the same Adam-scaled
    rounding noise; unsynchronised ranks differ on most weights by about the learning rate."""
    assert one.keys() == two.keys()
    real = {k: v for k, v in one.items() if not k.endswith(NOISE_ONLY)}
    assert len(real) > 0.9 * len(one)
    above = sum(int(((v - two[k]).abs() > SYNC_TOL).sum()) for k, v in real.items())
    assert above <= outliers, f"1 x batch 4 and 2 x batch 2 differ by {max_diff(real, {k: two[k] for k in real}):.3g} ({above} weights above {SYNC_TOL})"
    assert max_diff(one, two) <= 10 * SYNC_TOL


def test_two_spawned_processes_train_exactly_like_one_with_the_same_global_batch(data, straight_run, tmp_path):
    """2 x batch 2 (run.py spawns the gloo workers) ends where 1 x batch 4 ends; one process on
    half the batch, which is what a rank would train on without gradient averaging, ends far away."""
    two = tmp_path / "p2_b2"
    run_ok(base_flags(*data, two, batch_size=2, epoch=2, world_size=2, port=free_port()))
    assert "2 process(es) on cpu" in (two / "train.log").read_text()
    one, synced = last_weights(straight_run), last_weights(two)
    assert all(k.startswith("mask_decoder.") for k in one)
    assert_synchronised(one, synced)
    assert max_diff(one, initial_decoder(one)) > 1e-4  # training moved the weights

    half = tmp_path / "p1_b2"
    run_ok(base_flags(*data, half, batch_size=2, epoch=2, dist="no"))
    assert max_diff(one, last_weights(half)) > 20 * SYNC_TOL

    # Both runs saw the same images with the same model: the global metrics agree too.
    for a, b in zip(metrics(straight_run), metrics(two), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["val_iou"] == pytest.approx(b["val_iou"], abs=1e-4)


PER_OBJECT = {"prompt": "box+point", "num_points": 2, "point_mode": "random", "negative_points": 1,
              "box_jitter": 0.1, "augment": "flip,rot90,scale,color", "max_objects": 2}


def test_two_processes_match_one_with_per_object_points_augmentation_and_workers(tmp_path_factory, tmp_path):
    """Every random draw of the data (which 2 of the 3 objects, points, jitter, augmentation) is
    seeded by (seed, epoch, image): 2 x batch 2, each with a persistent DataLoader worker, ends
    where 1 x batch 4 in the main process ends."""
    root = tmp_path_factory.mktemp("objects")
    train = make_synthetic_dataset(root / "train", n=4, size_range=(64, 128), seed=5, objects=3)
    val = make_synthetic_dataset(root / "val", n=1, size_range=(64, 128), seed=6, objects=3)
    one, two = tmp_path / "p1_b4", tmp_path / "p2_b2"
    run_ok(base_flags(train, val, one, batch_size=4, epoch=2, dist="False", **PER_OBJECT))
    run_ok(base_flags(train, val, two, batch_size=2, epoch=2, world_size=2, port=free_port(), **dict(PER_OBJECT, num_workers=1)))
    assert_synchronised(last_weights(one), last_weights(two))
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_iou"] == pytest.approx(b["val_iou"], abs=1e-4)


# ----------------------------------------------------------------------------- b. the CI check


def test_torchrun_two_gloo_processes_on_the_nails_dataset(tmp_path):
    nails = require_shared_data("nails")
    out = tmp_path / "nails_run"
    args = ["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "256", "--epoch", "2",
            "--train_dir", str(nails), "--output_dir", str(out), "--num_workers", "0"]
    run_ok(args, torchrun=True)

    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    with torch.device("meta"):
        sam = sam_model_registry["vit_t"](image_size=256)
    heads = tuple(f"output_hypernetworks_mlps.{i}." for i in (1, 2, 3))  # unused by single-mask training
    decoder_keys = {f"mask_decoder.{k}" for k, _ in sam.mask_decoder.named_parameters() if not k.startswith(heads)}
    assert set(best["model"]) == decoder_keys
    assert best["model_type"] == "vit_t" and best["image_size"] == 256
    assert best["epoch"] in (1, 2) and best["metrics"]["epoch"] == best["epoch"]
    assert best["args"]["train_dir"] == str(nails) and best["args"]["epoch"] == 2

    base, *lines = metrics(out)
    assert [m["epoch"] for m in [base, *lines]] == [0, 1, 2]  # --eval_base (default): the starting model first
    assert 0 <= base["val_iou"] <= 1 and np.isfinite(base["val_loss"]) and "train_loss" not in base
    assert "epoch 0 (base model)" in (out / "train.log").read_text()
    for m in lines:
        for key in ("train_loss", "val_loss", "val_iou", "val_dice", "images_per_sec", "seconds"):
            assert np.isfinite(m[key]), (key, m)
        assert 0 <= m["val_iou"] <= 1 and 0 <= m["val_dice"] <= 1 and m["images_per_sec"] > 0 and m["seconds"] > 0
        # the default loss's named terms, whose weighted sum is the loss
        terms = sum(m[f"train_loss_{t}"] for t in ("bce", "iou", "iou_head"))
        assert terms == pytest.approx(m["train_loss"], rel=1e-5)
    assert lines[1]["train_loss"] < lines[0]["train_loss"], lines
    assert json.loads((out / "args.json").read_text())["image_size"] == 256
    log = (out / "train.log").read_text()
    assert "2 process(es) on cpu" in log and "epoch 2/2" in log


# ----------------------------------------------------------------------------- c. resume


def test_resume_after_an_interruption_reproduces_the_straight_run(data, straight_run, tmp_path):
    out = tmp_path / "interrupted"
    args = base_flags(*data, out, batch_size=4, epoch=2, dist="False")
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.pth").exists():  # written by an atomic rename: complete once it is there
            assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    assert len(metrics(out)) == 1, "the run was meant to be stopped after its first epoch"
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1

    resume_args = base_flags(*data, batch_size=4, epoch=2, dist="False", resume=out)
    run_ok(resume_args)
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    assert json.loads((out / "args.json").read_text())["resume"] is None  # the original flags are kept
    resumed_args = [json.loads(p.read_text()) for p in out.glob("args.resume-*.json")]
    assert [a["resume"] for a in resumed_args] == [str(out)]
    diff = max_diff(last_weights(out), last_weights(straight_run))
    assert diff <= 1e-6, f"resumed run differs from the straight run by {diff:.3g}"
    for a, b in zip(metrics(out), metrics(straight_run)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # Nothing is left to do: resuming a finished run trains no further and keeps the weights.
    before = (out / "last.pth").read_bytes()
    run_ok(resume_args)
    assert len(metrics(out)) == 2 and (out / "last.pth").read_bytes() == before


def test_resume_refuses_a_changed_schedule(data, straight_run, tmp_path):
    """The cosine schedule spans --epoch: continuing with another --epoch cannot follow it."""
    out = tmp_path / "short"
    run_ok(base_flags(*data, out, batch_size=4, epoch=1, dist="False"))
    before = (out / "last.pth").read_bytes()
    text = run_fails(base_flags(*data, batch_size=4, epoch=2, dist="False", resume=out))
    assert "--epoch 1 (now 2)" in text and "last.pth" in text
    assert (out / "last.pth").read_bytes() == before and len(metrics(out)) == 1


# ----------------------------------------------------------------------------- d. bad input


@pytest.fixture
def small_data(tmp_path):
    train = make_synthetic_dataset(tmp_path / "train", n=3, size_range=(48, 64), seed=3)
    val = make_synthetic_dataset(tmp_path / "val", n=1, size_range=(48, 64), seed=4)
    return train, val


def test_non_binary_mask_stops_before_any_worker_starts(small_data, tmp_path):
    train, val = small_data
    bad = train / "labels" / "0001.png"
    mask = cv2.imread(str(bad), cv2.IMREAD_GRAYSCALE)
    mask[: mask.shape[0] // 2][mask[: mask.shape[0] // 2] > 0] = 128  # an anti-aliased drawing, say
    assert 128 in np.unique(mask)
    cv2.imwrite(str(bad), mask)
    out = tmp_path / "run"
    text = run_fails(base_flags(train, val, out, world_size=2, port=free_port(), epoch=1))
    assert str(bad) in text and "not binary" in text
    assert "Traceback" not in text  # one clear message, not a crash in a worker
    assert not out.exists()


def test_non_binary_mask_under_torchrun_fails_on_every_rank_with_the_file_named(small_data, tmp_path):
    train, val = small_data
    bad = val / "labels" / "0000.png"
    mask = cv2.imread(str(bad), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(bad), np.where(mask > 0, 200, 0).astype(np.uint8))
    out = tmp_path / "run"
    text = run_fails(base_flags(train, val, out, epoch=1), torchrun=True)
    assert str(bad) in text
    # Every rank stops with the message (torchrun then reports the failed workers itself).
    assert "error (rank 0)" in text and "error (rank 1)" in text
    assert not (out / "best.pth").exists() and not (out / "last.pth").exists()


def test_missing_checkpoint_says_where_the_weights_are(small_data, tmp_path):
    out = tmp_path / "run"
    flags = base_flags(*small_data, out, epoch=1, world_size=2, port=free_port())
    flags[flags.index("--checkpoint") + 1] = str(tmp_path / "mobile_sam.pt")
    text = run_fails(flags)
    assert "mobile_sam.pt not found" in text and "github.com/ChaoningZhang/MobileSAM" in text
    assert "Traceback" not in text and not out.exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_paths_run(amp, small_data, tmp_path):
    """The autocast + grad-scaler code that CUDA uses by default, exercised on the CPU."""
    out = tmp_path / "run"
    run_ok(base_flags(*small_data, out, epoch=1, batch_size=3, dist="no", amp=amp))
    (line,) = metrics(out)
    assert np.isfinite(line["train_loss"]) and np.isfinite(line["val_loss"])
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["scaler"] != {} if amp == "fp16" else True
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # master weights stay fp32


def test_missing_mask_partner_is_named(small_data, tmp_path):
    train, val = small_data
    (train / "labels" / "0002.png").unlink()
    out = tmp_path / "run"
    text = run_fails(base_flags(train, val, out, dist="false", epoch=1))
    assert f"image without a partner: {train / 'images' / '0002.png'}" in text
    assert not out.exists()


def test_existing_output_dir_is_never_touched(small_data, tmp_path):
    out = tmp_path / "earlier_run"
    out.mkdir()
    files = {"best.pth": os.urandom(256), "metrics.jsonl": b'{"epoch": 1}\n', "notes.txt": b"keep me"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    text = run_fails(base_flags(*small_data, out, world_size=2, port=free_port(), epoch=1))
    assert str(out) in text and "already holds files" in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


# ----------------------------------------------------------------------------- e. early stopping


def test_patience_stops_when_validation_iou_stays_flat(small_data, tmp_path):
    out = tmp_path / "run"
    run_ok(base_flags(*small_data, out, dist="0", epoch=4, patience=1, lr=1e-12, batch_size=3))
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [1, 2], "epoch 1 improves on nothing, epoch 2 is stale: stop"
    assert lines[0]["val_iou"] == lines[1]["val_iou"]
    assert "early stop" in (out / "train.log").read_text()
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["epoch"] == 1
    # An LR of 1e-12 leaves the weights where fit() started, which pins initial_decoder (used
    # above to show that real training moves the weights) to what run.py really starts from.
    weights = last_weights(out)
    assert max_diff(weights, initial_decoder(weights)) <= 1e-6
