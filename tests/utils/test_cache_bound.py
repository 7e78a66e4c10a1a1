"""The embedding cache on a disk it must fit: the --cache_max_gb bound and its least-recently-used
eviction, a store that fails (full disk), two processes bounding one folder, the start-up line of
space needed against space free. Hand-computed orders on tiny tensors; training through the
shared helpers of test_cache."""

import errno
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from segment_anything.utils.data.cache import HEADER, EmbeddingCache, entry_bytes, open_cache
from test_cache import config, decoder, max_diff, new_sam, pairs, reference, train  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 4, 4)
ENTRY = HEADER.size + 16 * 4 * 4 * 2  # fp16


def key(i: int) -> str:
    return f"{i:02d}" * 20


def on_disk(cache: EmbeddingCache) -> set:
    return {path.rsplit("/", 1)[1][:2] for _, _, path in cache.entries()}


def test_the_bound_holds_and_the_least_recently_used_entries_go_first(tmp_path):
    cache = EmbeddingCache(tmp_path, "fp16", max_bytes=5 * ENTRY)
    for i in range(5):
        assert cache.store(key(i), torch.full(SHAPE, float(i)))
    assert cache.usage() == (5, 5 * ENTRY) and cache.stats.evicted == 0
    assert cache.lookup(key(0)) is not None  # 0 is now the most recently used
    # A sixth entry passes the bound: the oldest go until 4.5 - 1 = 3.5 entries are left: 1 and 2.
    assert cache.store(key(5), torch.full(SHAPE, 5.0))
    assert on_disk(cache) == {"00", "03", "04", "05"} and cache.stats.evicted == 2
    assert cache.lookup(key(1)) is None and cache.stats.misses == 1
    for i in range(6, 20):
        cache.store(key(i), torch.full(SHAPE, float(i)))
        assert cache.usage()[1] <= 5 * ENTRY
    assert torch.equal(cache.lookup(key(19)), torch.full(SHAPE, 19.0).half())
    # Another process's view of the same folder (a fresh estimate) keeps the bound too.
    other = EmbeddingCache(tmp_path, "fp16", max_bytes=5 * ENTRY)
    other.store(key(20), torch.zeros(SHAPE))
    assert cache.usage()[1] <= 5 * ENTRY and "20" in on_disk(cache)


def test_an_entry_larger_than_the_bound_is_not_stored(tmp_path, logged):
    cache = EmbeddingCache(tmp_path, "fp16", max_bytes=ENTRY - 1)
    assert not cache.store(key(0), torch.zeros(SHAPE)) and not cache.store(key(1), torch.zeros(SHAPE))
    assert cache.usage() == (0, 0) and cache.stats.failed_stores == 2
    assert logged.text.count("larger than --cache_max_gb") == 1


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, fd, mode):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_logged_once_and_leaves_nothing_behind(tmp_path, logged, monkeypatch):
    cache = EmbeddingCache(tmp_path, "fp16")
    monkeypatch.setattr(os, "fdopen", FullDisk)
    assert not cache.store(key(0), torch.zeros(SHAPE)) and not cache.store(key(1), torch.zeros(SHAPE))
    assert cache.stats.failed_stores == 2 and cache.stats.stores == 0
    assert logged.text.count("No space left on device") == 1 and "training goes on" in logged.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no temporary file left
    monkeypatch.undo()  # space again: stores work
    assert cache.store(key(0), torch.zeros(SHAPE)) and cache.lookup(key(0)) is not None


def test_training_on_a_full_disk_goes_on_and_trains_as_without_a_cache(pairs, reference, tmp_path, logged, monkeypatch):
    cache = EmbeddingCache(tmp_path, "fp32", {"weights": "w"})
    monkeypatch.setattr(os, "fdopen", FullDisk)
    sam, metrics = train(pairs, cache)
    assert [m["cache_hits"] for m in metrics] == [0, 0] and cache.stats.failed_stores == 6
    assert max_diff(decoder(sam), reference) <= 1e-6
    assert logged.text.count("cannot write to") == 1


def test_evicted_entries_are_recomputed_and_counted_as_misses(pairs, reference, tmp_path):
    """3 images, room for 2.5 entries. Epoch 1 stores 0, 1, then 2 evicts 0. Epoch 2 looks up
    0 (miss), 1 and 2 (hits, in that order), so storing 0 again evicts 1."""
    size = entry_bytes(new_sam(), "fp32")
    cache = EmbeddingCache(tmp_path, "fp32", {"weights": "w"}, max_bytes=size * 5 // 2)
    sam, metrics = train(pairs, cache)
    assert [m["cache_hits"] for m in metrics] == [0, 2] and cache.stats.evicted == 2
    assert cache.usage() == (2, 2 * size)
    # Image 0 is encoded alone in epoch 2 (its batch partner is a hit), not in a batch of two as
    # in the reference: the encoder's float rounding differs with the batch, hence not 1e-6.
    assert max_diff(decoder(sam), reference) <= 1e-4


WRITER = textwrap.dedent("""
    import sys, torch
    from segment_anything.utils.data.cache import EmbeddingCache
    root, name, bound = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = EmbeddingCache(root, "fp16", max_bytes=bound)
    for i in range(60):
        cache.store(f"{name}{i:02d}" * 10, torch.full((64, 16, 16), float(i)))
        for j in (i, i - 3, i - 9):  # the other process may be evicting these right now
            got = cache.lookup(f"{name}{j:02d}" * 10)
            assert got is None or torch.equal(got, torch.full((64, 16, 16), float(j)).half()), j
    assert cache.stats.corrupt == 0, cache.stats
    print(cache.stats.evicted)
""")


def test_two_processes_bounding_one_folder(tmp_path):
    size = HEADER.size + 64 * 16 * 16 * 2
    bound = 10 * size
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(bound)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("aa", "bb")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert all(int(out) > 0 for out, _ in results)  # both evicted
    cache = EmbeddingCache(tmp_path, "fp16")
    count, used = cache.usage()
    # Each process counts its own stores between scans: at most one tenth of the bound over per
    # other process (and the entry of the last store).
    assert used <= bound + bound // 10 + size and count >= 2
    assert cache.stats.corrupt == 0 and all(cache.lookup(p.rsplit("/", 1)[1][:40]) is not None for _, _, p in cache.entries())
    assert not list(tmp_path.rglob("*.tmp"))


def test_start_up_says_what_the_run_needs_and_what_the_disk_has(tmp_path, logged):
    sam = new_sam()
    size = entry_bytes(sam, "fp16")
    assert size == HEADER.size + 256 * 8 * 8 * 2  # 128 px: an (256, 8, 8) embedding
    open_cache(config(tmp_path).resolve().cache, sam, None, images=1000)
    assert f"needs up to {1000 * size / 2**30:.2f} GB (1000 images x {size / 2**20:.2f} MB); " in logged.text
    assert "GB free on its disk" in logged.text and "WARNING" not in logged.text
    logged.clear()
    open_cache(config(tmp_path, cache_max_gb=size * 10 / 2**30).resolve().cache, sam, None, images=1000)
    record = [r for r in logged.records if "needs up to" in r.message][0]
    assert record.levelno == logging.WARNING and "bounded to" in record.message
    assert "least recently used entries go first" in record.message and "recomputed every epoch" in record.message
