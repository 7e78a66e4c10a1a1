"""launch/*.sh: the multi-node script as two "nodes" of one CPU process each on this
machine (two torchrun agents on localhost, c10d rendezvous), without an activated virtual environment."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.training.launch import free_port

TIMEOUT = 300
SCRIPTS = ("torchrun.sh", "multinode.sh", "slurm.sh", "demo.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_their_arguments_on(script):
    text = (REPO / "launch" / script).read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0
    assert '"$@"' in text


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one node: drop srun's own options, run the task as node 0.
while [ "${1#-}" != "$1" ]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$SCONTROL_LOG"
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi
"""


def submit_slurm(tmp_path, args, **env_extra) -> subprocess.Popen:
    """launch/slurm.sh as sbatch would run it on one node, with srun and scontrol faked on PATH."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "SAM_TEST_FAULT")}
    env.update(PATH=f"{fake}:/usr/bin:/bin", SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1",
               SLURM_SUBMIT_DIR=str(REPO), RDZV_PORT=str(free_port()), RUN_DIR=str(tmp_path / "run"),
               SCONTROL_LOG=str(tmp_path / "scontrol.log"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sh"), *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()


def test_slurm_script_starts_a_job_then_a_requeued_job_continues_it(tmp_path):
    import time

    import torch

    train = make_synthetic_dataset(tmp_path / "train", n=6, size_range=(48, 64), seed=3)
    out = tmp_path / "run"
    args = ["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "64", "--epoch", "2",
            "--batch_size", "1", "--train_dir", str(train), "--num_workers", "0", "--threads", "1", "--save_every", "1"]
    # First submission: a new folder. The worker stalls at global step 3 (after saving step 2)
    # until the signals of a pre-emption arrive: USR1 to the batch script, then SIGTERM to all.
    first = submit_slurm(tmp_path, args, SAM_TEST_FAULT="hang:0:3")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.pth").exists() or torch.load(out / "last.pth", weights_only=True)["step"] < 2:
            assert first.poll() is None, f"the job ended before its first saves:\n{first.stdout.read()}"
            assert time.monotonic() < deadline, "no last.pth in time"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGUSR1)
        while "requeue 4242" not in (tmp_path / "scontrol.log").read_text():
            assert time.monotonic() < deadline, "USR1 did not requeue the job"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGTERM)
    finally:
        log = finish(first)
    text = (out / "train.log").read_text()
    assert "stopped by SIGTERM" in text, log[-4000:]
    assert (out / "args.json").is_file() and not list(out.glob("args.resume-*.json"))
    saved = torch.load(out / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) >= (0, 3)
    # The requeued job: the same command line, the same job id; it continues from last.pth.
    second = submit_slurm(tmp_path, args)
    log = finish(second)
    assert second.returncode == 0, log[-4000:]
    text = (out / "train.log").read_text()
    assert f"resumed from {out} at epoch {saved['epoch'] + 1}, step {saved['step']}" in text, text[-3000:]
    assert "epoch 2/2" in text and len(list(out.glob("args.resume-*.json"))) == 1
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def global_step(state) -> int:
    return state["epoch"] * state["steps_per_epoch"] + state["step"]


def children(pid: int) -> list:
    """Direct children of pid (Linux /proc): multinode.sh execs torchrun's agent, whose children are the workers."""
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*/children") for c in task.read_text().split()]


def two_nodes(tmp_path, args, out, max_restarts=0, kill_at_step=None):
    """launch/multinode.sh as two "nodes" of one gloo worker each; kill_at_step: SIGKILL node 1's
    worker once last.pth holds that global step. Returns both nodes' output."""
    import time

    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "SAM_TEST_FAULT")}
    env.update(PATH="/usr/bin:/bin", NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
               RDZV_ID=f"elastic-{out.name}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MAX_RESTARTS=str(max_restarts))
    nodes = [subprocess.Popen(["bash", str(REPO / "launch" / "multinode.sh"), *args, "--output_dir", str(out)],
                              cwd=tmp_path, env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in (0, 1)]
    try:
        if kill_at_step is not None:
            deadline = time.monotonic() + TIMEOUT
            while not (out / "last.pth").exists() or global_step(torch.load(out / "last.pth", weights_only=True)) < kill_at_step:
                assert time.monotonic() < deadline and nodes[1].poll() is None, "no mid-epoch last.pth in time"
                time.sleep(0.02)
            workers = [p for p in children(nodes[1].pid) if b"run.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
            assert len(workers) == 1, f"node 1 should have one worker, has {workers}"
            os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while any(node.poll() is None for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    logs = [node.communicate()[0] for node in nodes]
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank} (exit {node.returncode}):\n{log[-5000:]}\n---- node {1 - rank}:\n{logs[1 - rank][-3000:]}"
    return logs


ELASTIC_ARGS = ["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "64", "--epoch", "2", "--batch_size", "1",
                "--num_workers", "0", "--threads", "1", "--save_every", "1", "--seed", "5", "--resume", "auto"]


@pytest.fixture(scope="module")
def elastic_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    train = make_synthetic_dataset(root / "train", n=8, size_range=(48, 64), seed=7)
    val = make_synthetic_dataset(root / "val", n=1, size_range=(48, 64), seed=8)
    # 2 nodes x batch 1: 4 steps per epoch; a last.pth after every step.
    return root, [*ELASTIC_ARGS, "--train_dir", str(train), "--val_dir", str(val)]


@pytest.fixture(scope="module")
def straight_two_nodes(elastic_data):
    """The uninterrupted two-node run: the elastic test's reference, and the plain two-node test's run."""
    root, args = elastic_data
    two_nodes(root, args, root / "straight")
    return root / "straight"


def test_two_nodes_of_one_cpu_process_each(straight_two_nodes):
    """multinode.sh as two nodes of one process each (no virtual environment on PATH: the script
    finds the project's .venv itself; two_nodes checks that both nodes exit 0)."""
    text = (straight_two_nodes / "train.log").read_text()
    assert "2 process(es) on cpu" in text and "epoch 2/2" in text
    assert (straight_two_nodes / "best.pth").is_file() and (straight_two_nodes / "last.pth").is_file()


def test_a_worker_killed_mid_epoch_makes_torchrun_restart_the_group_which_continues_the_run(elastic_data, straight_two_nodes):
    import torch

    root, args = elastic_data
    logs = two_nodes(root, args, root / "elastic", max_restarts=1, kill_at_step=2)
    text = (root / "elastic" / "train.log").read_text()
    assert "torchrun restarted the workers (restart 1 of at most 1); the run continues from last.pth at epoch" in text, logs[0][-3000:]
    assert "torchrun restarted the workers" in logs[0] and "resumed from" in text
    straight = torch.load(straight_two_nodes / "last.pth", weights_only=True)
    elastic = torch.load(root / "elastic" / "last.pth", weights_only=True)
    assert global_step(elastic) == global_step(straight) == 8
    diff = max((straight["model"][k] - elastic["model"][k]).abs().max().item() for k in straight["model"])
    assert diff <= 1e-6, f"the restarted run differs from the uninterrupted one by {diff:.3g}"
