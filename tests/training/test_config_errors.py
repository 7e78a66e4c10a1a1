"""Flag errors of run.py: negative-looking numbers reach the real check, and every error is one
line naming the flag, not argparse's usage block."""

import subprocess
import sys

import pytest

from conftest import REPO
from segment_anything.training.config import TrainConfig

ENV_ARGS = ["--train_dir", "nowhere", "--checkpoint", "none"]


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        TrainConfig.from_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "-1e-3", "--lr must be > 0, got -0.001"),
    ("--lr", "-.5", "--lr must be > 0, got -0.5"),
    ("--epoch", "-1", "--epoch must be >= 1, got -1"),
    ("--dist_timeout", "-1E+2", "--dist_timeout must be > 0 seconds, got -100.0"),
    ("--box_jitter", "-0.1", "--box_jitter must be in [0, 0.5), got -0.1"),
])
def test_negative_numbers_reach_the_real_check(capsys, flag, value, message):
    assert error_of([*ENV_ARGS, flag, value], capsys) == f"error: {message}\n"


def test_argparse_errors_are_one_line(capsys):
    assert error_of([*ENV_ARGS, "--lr", "fast"], capsys) == "error: argument --lr: invalid float value: 'fast' " \
                                                           "(python run.py --help lists the flags)\n"
    text = error_of([*ENV_ARGS, "--no_such_flag", "1"], capsys)
    assert text.startswith("error: unrecognized arguments: --no_such_flag 1") and text.count("\n") == 1


def test_several_errors_one_line_each(capsys):
    text = error_of([*ENV_ARGS, "--lr", "-1", "--epoch", "0"], capsys)
    assert text == "error: --epoch must be >= 1, got 0\nerror: --lr must be > 0, got -1.0\n"


def test_run_py_negative_lr_is_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *ENV_ARGS, "--lr", "-1e-3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --lr must be > 0, got -0.001\n", proc.stderr


@pytest.mark.parametrize("extra,message", [
    (["--objects_per_step", "-4"], "--objects_per_step must be >= 0 (0 = off), got -4"),
    (["--objects_per_step", "32", "--batch_size", "4"],
     "--objects_per_step 32 fills each step by objects: leave --batch_size at 1 (it counts images), got 4"),
    (["--objects_per_step", "32", "--task", "semantic"],
     "--objects_per_step needs prompt training: --task semantic trains class maps, not objects"),
])
def test_objects_per_step_refuses_bad_values_and_combinations_in_one_line(capsys, extra, message):
    assert error_of([*ENV_ARGS, *extra], capsys) == f"error: {message}\n"


def test_objects_per_step_goes_with_accumulate_and_max_objects():
    cfg = TrainConfig.from_args([*ENV_ARGS, "--objects_per_step", "32", "--accumulate", "2", "--max_objects", "8"])
    assert (cfg.objects_per_step, cfg.accumulate, cfg.max_objects) == (32, 2, 8)
