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


def test_two_nodes_of_one_cpu_process_each(tmp_path):
    train = make_synthetic_dataset(tmp_path / "train", n=4, size_range=(48, 64), seed=7)
    out = tmp_path / "run"
    args = ["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "64", "--epoch", "1",
            "--train_dir", str(train), "--output_dir", str(out), "--num_workers", "0", "--threads", "1"]
    # No virtual environment on PATH: the script must find the project's .venv itself.
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH="/usr/bin:/bin", NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
               RDZV_ID="two-nodes-test", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(["bash", str(REPO / "launch" / "multinode.sh"), *args], cwd=tmp_path,
                              env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank}:\n{log[-4000:]}"
    text = (out / "train.log").read_text()
    assert "2 process(es) on cpu" in text and "epoch 1/1" in text
    assert (out / "best.pth").is_file() and (out / "last.pth").is_file()


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
