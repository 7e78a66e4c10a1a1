"""launch/*.sh (issue 12 §5, 13 §5): the multi-node script as two "nodes" of one CPU process each on this
machine (two torchrun agents on localhost, c10d rendezvous), without an activated virtual environment."""

import os
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
