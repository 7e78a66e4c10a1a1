"""A file of the run that cannot be written (disk full, quota, file size limit): the run stops with
one line naming the file and why, what is intact, and how to resume; no temporary file is left."""

import errno
import os
import re
import resource
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from segment_anything.tools import train as launcher
from segment_anything.training import launch
from segment_anything.tools.synthetic_data import make_synthetic_dataset
from segment_anything.utils import save_weight

TIMEOUT = 300
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return (make_synthetic_dataset(root / "train", n=3, size_range=(48, 64), seed=5),
            make_synthetic_dataset(root / "val", n=1, size_range=(48, 64), seed=6))


def flags(data, out, **extra) -> list:
    opts = {"checkpoint": "none", "image_size": 64, "num_workers": 0, "train_dir": data[0], "val_dir": data[1],
            "model_type": "vit_t", "output_dir": out, "epoch": 2, "threads": 1, "no_cache": "yes", **extra}
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def test_file_size_limit_stops_with_one_line_naming_the_file(data, tmp_path):
    """ulimit -f 30 MB: best.pth (15 MB) fits, last.pth (44 MB: weights and optimizer state) does not."""
    out = tmp_path / "run"
    limit = 30 * 2**20
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *flags(data, out)], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=TIMEOUT,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text and "Logging error" not in text, text
    errors = [line for line in text.splitlines() if " ERROR " in line or line.startswith("error")]
    assert len(errors) == 1, text
    assert f"could not write {out / 'last.pth'}: File too large" in errors[0], errors
    assert f"best.pth in {out} is intact" in errors[0] and "no last.pth yet" in errors[0], errors
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "best.pth").is_file() and not (out / "last.pth").exists()


def test_disk_full_later_keeps_the_previous_files_and_says_how_to_resume(data, tmp_path, monkeypatch):
    """No space at epoch 2's last.pth: epoch 1's best.pth and last.pth stay as they were."""
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(getattr(f, "name", f))
        if len(saves) == 4:  # best.pth and last.pth of epoch 1, best.pth of epoch 2, then last.pth
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(save_weight.torch, "save", save)
    lines = []
    real_setup = launch.setup_logging
    monkeypatch.setattr(launch, "setup_logging", lambda rank: capture(lines, real_setup(rank)))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as stop:
            launcher.main(flags(data, out, eval_base="no", lr=1e-2))
    finally:
        torch.set_num_threads(threads)
    assert stop.value.code == 1
    (line,) = [m for m in lines if "could not write" in m]
    assert f"could not write {out / 'last.pth'}: No space left on device" in line
    assert f"best.pth and last.pth in {out} are intact (epoch 1)" in line, line
    assert re.search(rf"--resume {re.escape(str(out))}$", line), line
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def capture(lines, logger):
    import logging

    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    return logger


def test_train_log_that_cannot_be_written_warns_once_without_a_traceback(tmp_path, capsys):
    from segment_anything.utils.log import add_log_file, setup_logging

    logger = setup_logging(0)
    add_log_file(logger, tmp_path / "train.log")
    handler = logger.handlers[-1]

    tries = []

    def full(*args):
        tries.append(args)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler.stream.write = full
    for k in range(3):
        logger.info(f"line {k}")
    out = capsys.readouterr()
    assert "Logging error" not in out.err and "Traceback" not in out.err, out.err
    warnings = [line for line in (out.out + out.err).splitlines() if "train.log" in line]
    assert len(warnings) == 1 and f"could not write {tmp_path / 'train.log'}: No space left on device" in warnings[0]
    assert "line 2" in out.out and len(tries) == 1  # the file is not tried again for every line


def test_pictures_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from segment_anything.training import writer

    writer.plot_curves([{"epoch": 0, "val_loss": 1.0, "val_iou": 0.1, "val_dice": 0.2}], tmp_path / "curves.png")
    before = (tmp_path / "curves.png").read_bytes()
    real_open = open

    def no_space(path, mode="r", *args, **kwargs):
        if "x" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_space)
    with pytest.raises(save_weight.WriteError, match="could not write .*curves.png: No space left on device"):
        writer.plot_curves([{"epoch": 0, "val_loss": 1.0, "val_iou": 0.5, "val_dice": 0.6}], tmp_path / "curves.png")
    monkeypatch.undo()
    assert (tmp_path / "curves.png").read_bytes() == before and len(list(tmp_path.iterdir())) == 1
