"""pyproject.toml: runtime dependencies are requirements.txt, extras pinned as in
requirements-dev.txt, every console command points at a main() that exists. The install itself is
checked by .ci/check_install (pip install -e . into a fresh virtual environment)."""

import importlib
import tomllib

import pytest

from conftest import REPO


def requirement_lines(name: str) -> set:
    lines = (REPO / name).read_text().splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip() and not line.startswith("-r")}


def test_dependencies_and_extras_follow_the_requirements_files():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert "dependencies" in project["project"]["dynamic"]
    dev_pins = requirement_lines("requirements-dev.txt") | requirement_lines("requirements.txt")
    dev_pins |= requirement_lines("requirements-ncut.txt")  # installed by .ci/run with --no-deps
    extras = project["project"]["optional-dependencies"]
    assert {"train", "onnx", "ncut", "dev"} <= set(extras)
    for name, pins in extras.items():
        assert set(pins) <= dev_pins, (name, set(pins) - dev_pins)
    assert set(extras["dev"]) == requirement_lines("requirements-dev.txt")


def test_a_default_run_needs_only_the_runtime_requirements():
    """curves.png and samples.png are drawn by every default run, COCO data is read by run.py:
    their packages are runtime requirements, not extras (.ci/check_main_job runs the demo so)."""
    runtime = {line.split("=")[0].split(">")[0] for line in requirement_lines("requirements.txt")}
    assert {"torch", "matplotlib", "pycocotools", "albumentations", "opencv-python-headless"} <= runtime
    assert "bash .ci/check_main_job" in (REPO / ".ci" / "run").read_text()


def test_console_commands_point_at_existing_functions():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sam-train"] == "segment_anything.tools.train:main"
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError, FileExistsError])
def test_console_commands_end_ctrl_c_bad_input_and_unusable_paths_in_one_line(monkeypatch, capsys, error):
    """Every tool's console command runs its main() through cli(): no traceback (sam-train has its own launcher)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        if name == "sam-train":
            continue
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)

        def fail(*args, **kwargs):
            if error is FileExistsError:
                raise FileExistsError(17, "File exists", "out/a.png")
            raise error("--flag: what is wrong")

        monkeypatch.setattr(module, "main", fail)
        with pytest.raises(SystemExit) as exit_info:
            getattr(module, func)()
        if error is KeyboardInterrupt:
            assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted (SIGINT)\n", name
        elif error is FileExistsError:  # a path in the way: named, no traceback
            assert exit_info.value.code == "error: out/a.png: a file is in the way: a folder is needed there " \
                                           "(give another output path)", name
        else:
            assert exit_info.value.code == "error: --flag: what is wrong", name


def test_ci_installs_the_ncut_pins_without_dependencies():
    """ncut-pytorch's declared dependencies (umap-learn and its numba/llvmlite stack, a source-only
    fpsample) are not wanted: .ci/run installs requirements-ncut.txt with --no-deps."""
    assert "--no-deps -r requirements-ncut.txt" in (REPO / ".ci" / "run").read_text()
    assert requirement_lines("requirements-ncut.txt") == {"ncut-pytorch==3.2.0", "fpsample==0.3.3"}
