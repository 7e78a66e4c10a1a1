"""bench/gpu_check.sh on a machine without CUDA: one line that says so, exit status 0, nothing run."""

import os
import subprocess

from conftest import REPO


def test_without_cuda_the_gpu_check_says_so_in_one_line_and_succeeds():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device") and "nothing checked" in lines[0]
    assert proc.stderr == ""
