"""The launcher: workers die with it, ports, bad weights, run folders, logs, threads.

Runs are vit_t with random weights at 64 px on a few synthetic images; every subprocess has a timeout.
"""

import io
import os
import re
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

from conftest import REPO, free_port
from segment_anything.tools import train as launcher
from segment_anything.training import engine
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.training.progress import Progress

TIMEOUT = 300
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train = make_synthetic_dataset(root / "train", n=4, size_range=(48, 64), seed=5)
    val = make_synthetic_dataset(root / "val", n=2, size_range=(48, 64), seed=6)
    return train, val


def flags(train: Path, val: Path, out: Path, **extra) -> list:
    opts = {"checkpoint": "none", "image_size": 64, "num_workers": 0, "train_dir": train, "val_dir": val,
            "model_type": "vit_t", "output_dir": out, "epoch": 1, **extra}
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def run(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)


def children(pid: int) -> list:
    """Direct children of pid (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in task.read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_ends_its_workers(data, tmp_path):
    out = tmp_path / "run"
    # SIGINT ignored, as for `python run.py ... &` in a script: then torch's own parent-death SIGINT does nothing.
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *flags(*data, out, epoch=10000, world_size=2)],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    workers = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "metrics.jsonl").exists():  # both workers are training
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        workers = [p for p in children(proc.pid) if alive(p)]
        workers = [p for p in workers if "spawn" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2, workers
        proc.kill()  # SIGKILL: the launcher cannot tell its workers anything
        proc.wait()
        deadline = time.monotonic() + 60  # generous: the point is that they go, not how fast
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "workers still running after the launcher died"
    finally:
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_port_in_use_is_one_line_naming_the_flag(data, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run(flags(*data, tmp_path / "run", world_size=2, port=port))
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: --port {port} is in use on 127.0.0.1 (another run?); pass another " \
                                    "--port, or leave --port out to use a free one", result.stderr
    assert not (tmp_path / "run").exists()


def test_a_text_file_as_checkpoint_stops_before_any_worker_and_leaves_no_folder(data, tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_text("a note, not weights\n")
    out = tmp_path / "run"
    result = run(flags(*data, out, world_size=2, checkpoint=weights))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"--checkpoint {weights} is not a PyTorch checkpoint" in result.stderr
    assert not out.exists()


def test_two_process_run_logs_quietly_to_a_pipe(data, tmp_path):
    """Not a terminal: no carriage-return bars, no deprecation warning per rank, the model table and the
    skipped files in train.log only, the default threads per process said and used."""
    train, val = data
    empty = np.zeros((40, 40), np.uint8)
    cv2.imwrite(str(train / "images" / "blank.png"), np.full((40, 40, 3), 90, np.uint8))
    cv2.imwrite(str(train / "labels" / "blank.png"), empty)
    try:
        out = tmp_path / "run"
        result = run(flags(train, val, out, world_size=2, skip_bad="yes"))
    finally:
        (train / "images" / "blank.png").unlink()
        (train / "labels" / "blank.png").unlink()
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr + result.stdout
    assert "Warning" not in result.stderr, result.stderr
    log = (out / "train.log").read_text()
    assert "Total params" in log and "Total params" not in result.stdout
    assert "skipped: " in log and "blank.png" in log and "blank.png" not in result.stdout
    threads = re.search(r"CPU threads per process: (\d+) \(", result.stdout + result.stderr).group(1)
    assert f"2 process(es) on cpu ({threads} CPU threads each)" in log


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure while building the model")

    monkeypatch.setattr(engine.Training, "build", broken)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="injected"):
            launcher.main(flags(*data, out, dist="no", threads=1))
        assert torch.get_num_threads() == 1  # --threads
    finally:
        torch.set_num_threads(threads)
    assert not out.exists()
    existing = tmp_path / "empty_before"
    existing.mkdir()
    with pytest.raises(RuntimeError, match="injected"):
        launcher.main(flags(*data, existing, dist="no"))
    assert existing.is_dir() and not any(existing.iterdir())  # reusable: what the run wrote is gone


def test_help_shows_each_default_once():
    text = TrainConfig.parser().format_help()
    blocks = text.split("\n  --")[1:]
    assert len(blocks) > 15
    for block in blocks:
        assert block.lower().count("default") <= 1, block
    assert "(default: None)" not in text


class CountingLoss:
    """Stands in for a device tensor and counts host reads (each .item() is a GPU sync)."""

    reads = 0

    def detach(self):
        return self

    def item(self) -> float:
        CountingLoss.reads += 1
        return 0.5


def test_progress_reads_the_loss_rarely_and_writes_plain_lines_off_a_terminal(caplog, monkeypatch):
    stream = io.StringIO()
    bar = Progress(total=100, desc="epoch 1/1", every=10, interval=3600, terminal=True, stream=stream)
    for _ in range(25):
        bar.step(4, CountingLoss())
    bar.close()
    assert CountingLoss.reads == 2  # steps 10 and 20, not 25
    assert "img/s" in stream.getvalue()

    CountingLoss.reads = 0
    silent = Progress(total=100, desc="epoch 1/1", enabled=False)
    for _ in range(25):
        silent.step(4, CountingLoss())
    assert CountingLoss.reads == 0  # ranks other than 0

    import logging
    logger = logging.getLogger("sam_finetune")
    caplog.set_level(logging.INFO, logger="sam_finetune")  # alone, no earlier run has set it up
    monkeypatch.setattr(logger, "propagate", False)  # caplog's handler is on the root logger too
    logger.addHandler(caplog.handler)
    try:
        plain = Progress(total=8, desc="epoch 2/3", interval=0, terminal=False, stream=io.StringIO())
        plain.step(4, CountingLoss())
        plain.step(4, CountingLoss())
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("epoch 2/3 | 8/8 img | loss 0.5000 | ") and lines[1].endswith(" img/s")


@pytest.mark.parametrize("cores,load,procs,expected", [(2, 4.7, 1, 1), (2, 0.1, 1, 2), (2, 0.9, 1, 1),
                                                        (16, 3.2, 2, 6), (16, 0.0, 4, 4), (4, 40.0, 2, 1)])
def test_default_threads_leave_the_cores_other_programs_use(monkeypatch, cores, load, procs, expected):
    from segment_anything.training import launch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (load, load, load))
    threads, note = launch.default_threads(procs)
    assert threads == expected
    assert note.startswith(f"CPU threads per process: {expected} ") and f"{cores} usable cores" in note
    assert f"load average {load:.1f}" in note and "--threads" in note


def test_omp_num_threads_is_taken_as_given_whatever_the_load(monkeypatch):
    """A run and its resumption must use the same thread count to train bit for bit alike."""
    from segment_anything.training import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    threads, note = launch.default_threads(2)
    assert threads == 3 and "OMP_NUM_THREADS" in note


@pytest.mark.parametrize("cmdline,argv0,expected", [
    (["/v/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "run.py", "--lr", "1e-3"], "run.py",
     "/v/bin/python -m torch.distributed.run --nproc_per_node 2 run.py --resume out"),
    (["/v/bin/python3", "/v/bin/torchrun", "--standalone", "--nproc_per_node=8", "/r/run.py", "--epoch", "3"], "/r/run.py",
     "torchrun --standalone --nproc_per_node=8 /r/run.py --resume out"),
    ([".venv/bin/python", "run.py", "--world_size", "2"], "run.py", ".venv/bin/python run.py --resume out"),
    (["/v/bin/python", "/v/bin/sam-train", "--train_dir", "d"], "/v/bin/sam-train", "sam-train --resume out"),
    (["python", "-m", "segment_anything.tools.train", "--train_dir", "d"], "/r/segment_anything/tools/train.py",
     "python -m segment_anything.tools.train --resume out"),
    ([], "run.py", "python run.py --resume out"),  # nothing readable: the documented command
])
def test_resume_command_repeats_how_the_run_was_launched(cmdline, argv0, expected):
    from segment_anything.training.resume import resume_command

    assert resume_command("out", cmdline, argv0) == expected


@pytest.mark.parametrize("where", ["under_a_file", "sysfs", "file"])
def test_an_output_folder_that_cannot_be_written_is_one_line_naming_the_flag(data, tmp_path, where):
    (tmp_path / "notes.txt").write_text("a file")
    out = {"under_a_file": tmp_path / "notes.txt" / "run", "sysfs": Path("/sys/sam_finetune_run"),
           "file": tmp_path / "notes.txt"}[where]
    result = run(flags(*data, out, world_size=2))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --output_dir {out}: "), line
    assert "world size" not in result.stdout  # refused before any worker started
    assert (tmp_path / "notes.txt").read_text() == "a file"
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_ctrl_c_under_torchrun_no_traceback_and_the_hint_resumes(data, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "segment_anything.tools.torchrun", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "run.py"]
    proc = subprocess.Popen([*launcher, *flags(*data, out, epoch=10000, threads=1)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.pth").exists():  # an epoch is done
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        text, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, text
    assert "Traceback" not in text and "SignalException" not in text, text
    hint = re.search(r"To continue: (.*)$", text, re.M).group(1)
    assert hint == f"{sys.executable} -m segment_anything.tools.torchrun --nproc_per_node 2 --master_port " \
                   f"{launcher[6]} run.py --resume {out}", text
    import shlex

    # The hint resumes the same way: two torchrun workers (a world size of 1 would be refused).
    again = subprocess.Popen(shlex.split(hint), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while f"resumed from {out}" not in (out / "train.log").read_text():
            assert again.poll() is None and time.monotonic() < deadline, again.stdout.read()
            time.sleep(0.2)
        os.killpg(again.pid, signal.SIGINT)
        text, _ = again.communicate(timeout=TIMEOUT)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    assert again.returncode == 128 + signal.SIGINT and "Traceback" not in text, text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
@pytest.mark.parametrize("how", ["torchrun", "spawn"])
def test_ctrl_c_while_starting_up_is_one_line_and_leaves_no_run_folder(data, tmp_path, how):
    """Ctrl-C before the first step (here while rank 0 is still setting up): no traceback from any
    process, the exit code of SIGINT, one line on what is kept, and no half-made run folder."""
    out = tmp_path / "run"
    if how == "torchrun":
        command = [sys.executable, "-m", "segment_anything.tools.torchrun", "--nproc_per_node", "2",
                   "--master_port", str(free_port()), "run.py", *flags(*data, out, threads=1)]
    else:
        command = [sys.executable, "run.py", *flags(*data, out, threads=1, world_size=2)]
    env = dict(ENV, SAM_TEST_FAULT="sigint:0:-1")  # rank 0 signals its process group, as a terminal would
    result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=TIMEOUT, start_new_session=True)
    assert result.returncode == 128 + signal.SIGINT, result.stdout
    assert "Traceback" not in result.stdout and "KeyboardInterrupt" not in result.stdout, result.stdout
    assert result.stdout.count("interrupted (SIGINT) before the first save; nothing to resume") == 1, result.stdout
    assert not out.exists()


def test_interrupted_message_names_what_is_kept(tmp_path):
    from segment_anything.training.launch import interrupted_message

    assert interrupted_message(None) == interrupted_message(tmp_path) == \
        "interrupted (SIGINT) before the first save; nothing to resume"
    (tmp_path / "last.pth").write_bytes(b"")
    line = interrupted_message(tmp_path)
    assert line.startswith(f"interrupted (SIGINT) outside the training steps; {tmp_path / 'last.pth'} is unchanged. "
                           "To continue: ") and line.endswith(f"--resume {tmp_path}"), line


def test_validation_clicks_are_off_by_default():
    """Corrective clicks multiply the decoder passes of validation (1+3+5 per start, from a point and
    from a box); a run asks for them with --val_clicks."""
    assert TrainConfig().val_clicks == ""
    assert "--val_clicks" in TrainConfig.parser().format_help()


def test_validation_has_a_progress_of_images(data):
    from segment_anything import sam_model_registry
    from segment_anything.utils.data import MaskDataset, collate, load_records
    from segment_anything.utils.trainer import evaluate
    from segment_anything.training.progress import shard_images

    records = load_records(data[0])  # 4 images
    dataset = MaskDataset(records, 64, max_objects=1, train=False)
    subset = torch.utils.data.Subset(dataset, list(range(len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=2, collate_fn=collate)
    steps = []

    class Recorder:
        def step(self, images, loss=None):
            steps.append(images)

    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=64)
    evaluate(sam, loader, torch.device("cpu"), None, progress=Recorder())
    assert sum(steps) == shard_images(loader) == 4 and len(steps) == 2
    bar = Progress(total=4, desc="validation 1/1", terminal=False, interval=0.0)
    bar.step(2, None)
    assert bar.line().startswith("validation 1/1 | 2/4 img | loss -")


def test_under_torchrun_restarts_a_run_must_be_one_that_restarted_workers_can_continue(monkeypatch):
    """torchrun --max_restarts K sets TORCHELASTIC_MAX_RESTARTS in every worker; the refusal comes
    from the flag parser, one line, before any data is read."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit):
        TrainConfig.from_args(["--train_dir", "data"])
    assert "torchrun --max_restarts 3 restarts the workers after a failure; give --output_dir DIR --resume auto" in stderr.getvalue()
    assert TrainConfig.from_args(["--train_dir", "data", "--resume", "auto", "--output_dir", "new-run"]).resume is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's one store for every attempt
    with pytest.raises(SystemExit):
        TrainConfig.from_args(["--train_dir", "data", "--resume", "auto", "--output_dir", "new-run"])
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in stderr.getvalue()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: nothing to check
    assert TrainConfig.from_args(["--train_dir", "data"]).resume is None


@pytest.mark.parametrize("flags, message", [
    (["--nproc_per_node", "0"], "--nproc_per_node (NPROC in launch/*.sh) must be a whole number >= 1 or one of auto, "
                                "cpu, gpu, xpu, got '0'"),
    (["--nproc_per_node", "two"], "got 'two'"),
    (["--max_restarts", "-1"], "--max_restarts (MAX_RESTARTS in launch/*.sh) must be >= 0, got -1"),
])
def test_torchrun_wrapper_names_a_bad_process_count_or_restart_count(flags, message):
    """torchrun ends these with a traceback (one of them an AssertionError without a message)."""
    from segment_anything.tools import torchrun

    with pytest.raises(SystemExit) as exit:
        torchrun.main(["--standalone", *flags, "run.py", "--epoch", "1"])
    assert str(exit.value).startswith("error: ") and message in str(exit.value)
