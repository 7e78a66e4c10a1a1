"""The manifest of checked samples (utils/data/manifest.py) through prepare's load_records: a second
check decodes nothing that did not change, a changed or new file is checked again, a bad file is
named on every check, and the forked-process check gives the threads' results."""

import os

import cv2
import numpy as np
import pytest

from segment_anything.tools.synthetic_data import make_synthetic_dataset
from segment_anything.utils.data import DataError, load_records
from segment_anything.utils.data import checks
from segment_anything.utils.data.formats import folder
from segment_anything.utils.data.manifest import manifest_dir


def age(root, when=1_600_000_000):
    """Every file of root older than the manifest's racy window (one fixed time: a changed file
    keeps it, so only its size tells)."""
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def counting(monkeypatch):
    """Count the images the folder format decodes."""
    decoded = []
    real = folder.load_image
    monkeypatch.setattr(folder, "load_image", lambda path, spec: decoded.append(str(path)) or real(path, spec))
    return decoded


def test_a_second_check_decodes_only_what_changed(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "train", n=6, size_range=(40, 60), seed=1, objects=2)
    age(root)
    decoded = counting(monkeypatch)
    first = load_records(root)
    assert len(decoded) == 6 and list(manifest_dir().glob("*.pkl"))
    decoded.clear()
    assert load_records(root) == first and decoded == []
    # One mask rewritten (another size), one pair added: those two are decoded again.
    cv2.imwrite(str(root / "labels" / "0002.png"), np.full((7, 9), 255, np.uint8))
    age(root)
    make_synthetic_dataset(tmp_path / "more", n=1, size_range=(40, 60), seed=9)
    os.replace(tmp_path / "more" / "images" / "0000.png", root / "images" / "9999.png")
    os.replace(tmp_path / "more" / "labels" / "0000.png", root / "labels" / "9999.png")
    age(root)
    decoded.clear()
    with pytest.raises(DataError, match="size mismatch: image .*0002.png"):
        load_records(root)
    assert sorted(os.path.basename(p) for p in decoded) == ["0002.png", "9999.png"]


def test_a_bad_file_is_named_on_every_check(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "train", n=3, size_range=(40, 60), seed=2)
    (root / "images" / "0001.png").write_bytes(b"not a png")
    age(root)
    for _ in range(2):
        with pytest.raises(DataError, match="0001.png"):
            load_records(root)
    decoded = counting(monkeypatch)
    assert len(load_records(root, skip_bad=True)) == 2 and [os.path.basename(p) for p in decoded] == ["0001.png"]


def test_recent_files_are_not_trusted_by_their_time(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "train", n=2, size_range=(40, 60), seed=3)
    load_records(root)
    decoded = counting(monkeypatch)
    load_records(root)  # written a moment ago: a change within the time resolution would not show
    assert len(decoded) == 2


def test_processes_give_the_threads_results(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "train", n=12, size_range=(40, 60), seed=4, objects=3)
    (root / "labels" / "0005.png").write_bytes(b"broken")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg1"))
    threads = load_records(root, skip_bad=True)
    monkeypatch.setattr(checks, "PROCESS_MIN", 2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg2"))
    processes = load_records(root, skip_bad=True)
    assert processes == threads and len(threads) == 11
    monkeypatch.setattr(checks, "TASKS_PER_WORKER", 1)  # tasks of 6 samples: results still in order
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg3"))
    assert load_records(root, skip_bad=True) == threads


@pytest.mark.parametrize("process_min", [2, 1000])
def test_opencv_runs_one_thread_while_checking_and_gets_its_threads_back(monkeypatch, process_min):
    """Each checking process or thread has a core: OpenCV's own threads would spin on them."""
    monkeypatch.setattr(checks, "PROCESS_MIN", process_min)  # 2: forked processes, 1000: threads
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        seen, problems = checks.run_checks(list(range(6)), lambda c: cv2.getNumThreads(), workers=2)
        assert seen == [1] * 6 and not problems
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)
