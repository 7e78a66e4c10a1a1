"""No file we read can run code: a weights or resume file whose pickle calls a function is refused
by every entry point with one line naming the file, and the function never runs.

The hostile files below call os.system to create a marker file; each test asserts the marker is
never written. The resume format itself is checked too: last.pth loads with weights_only=True and
its generator states round-trip exactly."""

import os
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from segment_anything.training.resume import RESUME_FORMAT, ResumeError, load_state, rng_state, set_rng_state
from segment_anything.utils.save_weight import UnsafeFileError, load_data_only
from segment_anything.utils.weights import check_checkpoint, inspect_weights

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class _Payload:
    """Pickles as a call of os.system: loading the file unrestricted would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_resume_file(folder: Path, marker: Path) -> Path:
    """A last.pth with every key a resume file has, plus a payload among its RNG states."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": RESUME_FORMAT, "model": {"mask_decoder.iou_token.weight": torch.zeros(1, 256)},
             "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {}, "epoch": 0, "step": 1,
             "world_size": 1, "batch_size": 1, "accumulate": 1, "rng": [{"numpy": _Payload(marker)}],
             "args": {"model_type": "vit_t", "image_size": 128}}
    torch.save(state, folder / "last.pth")
    return folder / "last.pth"


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "MARKER"
    path = hostile_resume_file(tmp_path / "run", marker)
    yield path, marker
    assert not marker.exists(), "the hostile file's code ran"


def one_line_refusal(proc: subprocess.CompletedProcess, path: Path) -> str:
    text = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    line = text.splitlines()[-1]
    assert str(path) in line and "contains code, not only data" in line, text
    return line


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_the_loader_refuses_code_and_names_what_it_calls(hostile):
    path, _ = hostile
    with pytest.raises(UnsafeFileError, match=r"contains code.*posix\.system|contains code.*os\.system"):
        load_data_only(path)
    with pytest.raises(ResumeError, match="--resume: .*contains code"):
        load_state(path)
    info = inspect_weights(path)
    assert info.kind == "unsafe" and "contains code" in info.describe()
    with pytest.raises(ValueError, match="contains code"):
        check_checkpoint(path, "vit_t", 128)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.full((40, 48, 3), 120, np.uint8))
    return path


def small_folder_set(data: Path) -> Path:
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 255
    for i in range(2):
        cv2.imwrite(str(data / "images" / f"{i}.png"), np.full((40, 48, 3), 100, np.uint8))
        cv2.imwrite(str(data / "masks" / f"{i}.png"), mask)
    return data


def test_run_py_resume_and_checkpoint_refuse_it(hostile, tmp_path):
    path, _ = hostile
    one_line_refusal(run("run.py", "--resume", str(path.parent)), path)
    data = small_folder_set(tmp_path / "data")
    one_line_refusal(run("run.py", "--train_dir", str(data), "--model_type", "vit_t", "--image_size", "128",
                         "--checkpoint", str(path), "--output_dir", str(tmp_path / "out")), path)


def test_load_model_ex_refuses_it(hostile, image, tmp_path):
    path, _ = hostile
    one_line_refusal(run("load_model_ex.py", "--checkpoint", "none", "--weights", str(path), "--image", str(image),
                         "--output", str(tmp_path / "m.png")), path)


@pytest.mark.parametrize("tool", ["predict", "export_onnx", "ncut", "evaluate"])
@pytest.mark.parametrize("flag", ["--weights", "--checkpoint"])
def test_every_tool_refuses_it(tool, flag, hostile, image, tmp_path):
    path, _ = hostile
    model = ["--model_type", "vit_t", "--image_size", "128"]
    files = {"--checkpoint": "none", "--weights": None}
    files[flag] = str(path)
    if tool == "evaluate" and files["--weights"] is None:
        files["--weights"] = str(path)  # evaluate needs a --weights; the hostile one is then refused either way
    given = [x for k, v in files.items() if v is not None for x in (k, v)]
    extra = {"predict": ["--image", str(image), "--output", str(tmp_path / "o")],
             "export_onnx": ["--output", str(tmp_path / "d.onnx")],
             "ncut": ["--image", str(image), "--output", str(tmp_path / "n.png"), "--image_sizes", "128"],
             "evaluate": ["--data_dir", str(small_folder_set(tmp_path / "data")), "--output_dir", str(tmp_path / "e")]}[tool]
    if tool == "ncut":
        model = ["--model_type", "vit_t"]
    one_line_refusal(run("-m", f"segment_anything.tools.{tool}", *model, *given, *extra), path)


def test_resume_files_are_weights_only_and_restore_every_generator_exactly(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.normal()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = rng_state()
    torch.save({"format": RESUME_FORMAT, "rng": [state]}, tmp_path / "s.pth")
    expected = (torch.rand(3), np.random.normal(size=3), [random.gauss(0, 1), random.random()])
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)["rng"][0]
    set_rng_state(loaded)
    again = (torch.rand(3), np.random.normal(size=3), [random.gauss(0, 1), random.random()])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_an_older_resume_file_with_numpy_states_still_loads_data_only(tmp_path):
    np.random.seed(7)
    random.seed(8)
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = (np.random.rand(2), random.random())
    torch.save({"format": "sam-resume-v2", "rng": [old_rng], "model": {"w": torch.zeros(1)}}, tmp_path / "last.pth")
    state = load_state(tmp_path / "last.pth")
    set_rng_state(state["rng"][0])
    assert np.array_equal(np.random.rand(2), expected[0]) and random.random() == expected[1]


def test_no_unrestricted_load_anywhere_in_the_tree():
    banned = ("weights_only=" + "False", "pickle." + "load(", "pickle." + "loads(", "torch." + "load(")
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        if {".venv", ".oracle", ".git"} & set(path.relative_to(REPO).parts):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for word in banned[:3]:
                if word in line:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            if banned[3] in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_check_manifest_that_holds_code_is_ignored_unrun(tmp_path):
    """The start-up manifest is a cache we read back: a foreign class or a function in it makes
    the whole file ignored (everything is checked again), and nothing in it runs."""
    import pickle

    from segment_anything.utils.data.manifest import VERSION, Manifest

    marker = tmp_path / "MARKER"
    path = tmp_path / "manifest.pkl"
    path.write_bytes(pickle.dumps((VERSION, {"key": ([], _Payload(marker))})))
    assert Manifest(path, "context").entries == {}
    assert not marker.exists()
