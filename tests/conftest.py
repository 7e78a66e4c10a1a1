"""Shared test helpers: repository paths, the in-process oracle, seeded random models."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
META_SAM_DIR = REPO / ".oracle" / "segment-anything-1.0"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(min(2, os.cpu_count() or 1))


# Runs in tests (and their subprocesses) use a fresh embedding cache and manifest folder, never
# ~/.cache. Set when this file is imported, before test modules copy os.environ into the
# environments of the runs they start.
_CACHE_BEFORE = os.environ.get("XDG_CACHE_HOME")
PRIVATE_CACHE = Path(tempfile.mkdtemp(prefix="sam_test_cache_"))
os.environ["XDG_CACHE_HOME"] = str(PRIVATE_CACHE)


@pytest.fixture
def logged(caplog):
    """caplog with the project's log records at INFO and above (its logger does not propagate
    to the root logger, where caplog listens, outside this fixture)."""
    from segment_anything.utils.log import LOGGER_NAME

    logging.getLogger(LOGGER_NAME).propagate = True
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
            yield caplog
    finally:
        logging.getLogger(LOGGER_NAME).propagate = False


@pytest.fixture(autouse=True, scope="session")
def private_embedding_cache():
    yield PRIVATE_CACHE
    if _CACHE_BEFORE is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = _CACHE_BEFORE
    shutil.rmtree(PRIVATE_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use it with pytestmark = pytest.mark.usefixtures("one_thread")).
    Tiny tensors gain nothing from a second thread, and on a shared 2-core machine every parallel
    region waits for the busy core (a tiny encoder call then takes many times longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="session")
def mobile_sam():
    """The in-process oracle: Meta's modeling code plus TinyViT (package mobilesam-mirror)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it re-registers timm models on import
        import mobile_sam
    return mobile_sam


def require_shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the real datasets live in ../shared/data beside the repository)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script_text: str, tmp_path: Path, *args, world_size: int = 2, timeout: int = 120,
              pythonpath=(REPO,)) -> list:
    """Run a gloo rank script as world_size processes (argv: rank, port, *args), one thread each;
    each prints 'RESULT <json>'. Returns the parsed results by rank; a failing rank fails the
    test with its output."""
    script = tmp_path / "rank_script.py"
    script.write_text(script_text)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), *map(str, args)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world_size)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-4000:]}"
            results.append(json.loads(out.split("RESULT ", 1)[1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
