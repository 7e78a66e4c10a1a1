"""Tests for the embedding cache (segment_anything.utils.data.cache) and the step that reads it.

Models are vit_t with random weights at a 128-pixel input (embeddings (256, 8, 8)); the data are
three small synthetic images.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO
from segment_anything import sam_model_registry
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.data.cache import EmbeddingCache, open_cache
from segment_anything.utils.interactive import InteractiveStep
from segment_anything.utils.losses import DEFAULT_LOSS_SPEC
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure
from segment_anything.utils.trainer import SamTrainStep, evaluate, train_one_epoch

SIZE = 128
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Three records (one image and one object each)."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=3, size_range=(70, 200), seed=3)
    return load_records(root)


def new_sam(seed: int = 0, image_size: int = SIZE):
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=image_size)
    randomize_(sam.image_encoder, seed=seed)
    configure(sam, TrainPlan())
    return sam


def config(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"model_type": "vit_t", "checkpoint": "none", "image_size": SIZE,
                          "cache_dir": str(tmp_path / "cache"), **kw})


# ------------------------------------------------------------------ storage: hit, miss, corrupt


def test_store_then_lookup_returns_the_tensor_in_the_cache_dtype(tmp_path):
    cache = EmbeddingCache(tmp_path, "fp16")
    x = torch.randn(256, 8, 8)
    assert cache.lookup("ab" * 20) is None and cache.stats.misses == 1
    cache.store("ab" * 20, x)
    got = cache.lookup("ab" * 20)
    assert cache.stats.hits == 1
    assert got.dtype == torch.float16 and torch.equal(got, x.half())
    assert cache.usage() == (1, cache.path("ab" * 20).stat().st_size)
    assert not [p for p in cache.path("ab" * 20).parent.iterdir() if p.suffix == ".tmp"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_other_dtypes_round_trip_exactly(tmp_path, dtype):
    cache = EmbeddingCache(tmp_path, dtype)
    x = torch.randn(4, 3, 3)
    cache.store("cd" * 20, x)
    assert torch.equal(cache.lookup("cd" * 20).float(), cache.round_trip(x))
    if dtype == "fp32":
        assert torch.equal(cache.lookup("cd" * 20), x)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_corrupt_entry_is_a_logged_miss_and_is_rewritten(tmp_path, damage, logged):
    cache = EmbeddingCache(tmp_path, "fp16")
    key, x = "ef" * 20, torch.randn(16, 4, 4)
    cache.store(key, x)
    data = bytearray(cache.path(key).read_bytes())
    if damage == "truncate":
        data = data[:-10]
    elif damage == "flip":
        data[-3] ^= 0x40
    else:
        data = b""
    cache.path(key).write_bytes(bytes(data))
    assert cache.lookup(key) is None
    assert cache.stats.corrupt == 1 and cache.stats.misses == 1
    assert "corrupt" in logged.text and str(cache.path(key)) in logged.text
    cache.store(key, x)
    assert torch.equal(cache.lookup(key), x.half())


def test_an_entry_of_the_earlier_format_is_a_quiet_miss_and_is_rewritten(tmp_path, logged):
    """Entries written with the BLAKE2b digest (format 01) are recomputed once: a miss, not a
    damaged file, and nothing logged."""
    import hashlib

    from segment_anything.utils.data.cache import HEADER

    cache = EmbeddingCache(tmp_path, "fp16")
    key, x = "ab" * 20, torch.randn(16, 4, 4)
    payload = x.half().reshape(-1).view(torch.uint8).numpy().tobytes()
    old = HEADER.pack(b"SAMEMB01", b"float16", 16, 4, 4, len(payload), hashlib.blake2b(payload, digest_size=32).digest())
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(old + payload)
    assert cache.lookup(key) is None
    assert cache.stats.misses == 1 and cache.stats.corrupt == 0 and not logged.text
    cache.store(key, x)
    assert torch.equal(cache.lookup(key), x.half()) and cache.stats.hits == 1


# ------------------------------------------------------------------ keys: staleness


def key_of(cfg, sam, image) -> str:
    return open_cache(cfg.resolve().cache, sam, None, log=False).key_for(image)


def test_every_key_part_changes_the_key(tmp_path, pairs):
    image = tmp_path / "a.png"
    image.write_bytes(Path(pairs[0].image).read_bytes())
    sam = new_sam(0)
    base = key_of(config(tmp_path), sam, image)
    assert key_of(config(tmp_path), new_sam(0), image) == base  # same everything: same entry
    changed = {
        "weights": key_of(config(tmp_path), new_sam(1), image),
        "image size": key_of(config(tmp_path, image_size=64), new_sam(0, 64), image),
        "model type": key_of(config(tmp_path, model_type="vit_b"), sam, image),
        "cache dtype": key_of(config(tmp_path, cache_dtype="fp32"), sam, image),
        "compute dtype": open_cache(config(tmp_path).resolve().cache, sam, torch.bfloat16, log=False).key_for(image),
        "intensity range": key_of(config(tmp_path, intensity_range="0,4095"), sam, image),
        "channels": key_of(config(tmp_path, channels="0,1,1"), sam, image),
        "plane": key_of(config(tmp_path, plane=1), sam, image),
    }
    sam.pixel_mean += 1.0  # the normalisation is part of the encoder input
    changed["pixel mean"] = key_of(config(tmp_path), sam, image)
    os.utime(image, ns=(1, 1))  # touched but the same bytes: still the same entry
    assert key_of(config(tmp_path), new_sam(0), image) == base
    image.write_bytes(Path(pairs[1].image).read_bytes())
    changed["image bytes"] = key_of(config(tmp_path), new_sam(0), image)
    assert all(key != base for key in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_cache_is_off_with_a_reason(tmp_path, logged):
    sam = new_sam(0)
    assert open_cache(config(tmp_path, no_cache=True).resolve().cache, sam, None) is None
    sam.image_encoder.requires_grad_(True)
    assert open_cache(config(tmp_path).resolve().cache, sam, None) is None
    sam.image_encoder.requires_grad_(False)
    cfg = config(tmp_path)
    object.__setattr__(cfg, "augment", "flip")  # the data issue's flag
    assert open_cache(cfg.resolve().cache, sam, None) is None
    assert open_cache(config(tmp_path).resolve().cache, sam, None) is not None
    text = logged.text
    assert "--no_cache" in text and "image encoder is trained" in text and "--augment flip" in text
    assert f"embedding cache: {tmp_path / 'cache'} (0 entries" in text


# ------------------------------------------------------------------ concurrency


WRITER = textwrap.dedent("""
    import sys, torch
    from segment_anything.utils.data.cache import EmbeddingCache
    cache = EmbeddingCache(sys.argv[1], "fp16")
    for round_ in range(int(sys.argv[2])):
        for i in range(10):
            key = f"{i:02d}" * 20
            cache.store(key, torch.full((64, 16, 16), float(i)))
            got = cache.lookup(key)  # another process may be replacing it right now
            assert got is None or torch.equal(got, torch.full((64, 16, 16), float(i)).half()), key
    assert cache.stats.corrupt == 0, cache.stats
""")


def test_two_processes_filling_one_cache(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "30"], env=env, cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    cache = EmbeddingCache(tmp_path, "fp16")
    for i in range(10):
        assert torch.equal(cache.lookup(f"{i:02d}" * 20), torch.full((64, 16, 16), float(i)).half())
    assert cache.usage()[0] == 10
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


# ------------------------------------------------------------------ training from the cache


def train(pairs, cache, epochs=2, seed=0, cfg=None):
    """epochs of train_one_epoch over fixed batches (2 images, then 1); returns (sam, metrics).
    cfg: a TrainConfig with interactive training (its plan and InteractiveStep) instead of the box step."""
    sam = new_sam(seed)
    spec = cfg.resolve().interactive if cfg is not None else None
    if spec is not None:
        configure(sam, cfg.resolve().plan)
    step = SamTrainStep(sam) if spec is None else InteractiveStep(sam, spec, DEFAULT_LOSS_SPEC)
    ds = MaskDataset(pairs, SIZE, cache=cache)
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = []
    for epoch in range(epochs):
        loader = [[ds[0], ds[1]], [ds[2]]]
        out.append(train_one_epoch(step, sam, loader, opt, sched, scaler, CPU, None, cache=cache,
                                   interactive=spec, epoch=epoch))
    return sam, out


def decoder(sam):
    return {k: v for k, v in sam.state_dict().items() if k.startswith("mask_decoder.")}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(pairs):
    return decoder(train(pairs, None)[0])


def fill(pairs, cache):
    """A cold run fills the cache: every image a miss, then a store."""
    _, m = train(pairs, cache, epochs=1)
    assert m[0]["cache_hits"] == 0 and cache.usage()[0] == len(pairs)


def test_warm_fp32_cache_trains_the_same_decoder_without_the_encoder(pairs, reference, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path, "fp32", {"weights": "w"})
    fill(pairs, cache)
    # From a warm cache the encoder must not run and the images must not be read at all.
    monkeypatch.setattr(type(new_sam().image_encoder), "forward", lambda *a: pytest.fail("encoder called"))
    monkeypatch.setattr(type(pairs[0]), "load_image", lambda *a: pytest.fail("image read"))
    sam, m = train(pairs, cache)
    assert [x["cache_hits"] for x in m] == [3, 3]
    assert max_diff(decoder(sam), reference) <= 1e-6
    val = evaluate(sam, [[MaskDataset(pairs, SIZE, cache=cache)[i]] for i in range(3)], CPU, None, cache=cache)
    assert val["cache_hits"] == 3


def test_interactive_steps_read_the_cache_and_train_as_without_it(pairs, tmp_path, monkeypatch):
    """Click rounds (--click_rounds 2 --multimask) from a warm fp32 cache: no
    encoder call, and the decoder ends where the same steps with the encoder end."""
    cfg = TrainConfig(model_type="vit_t", checkpoint="none", click_rounds=2, multimask=True)

    def run(cache, epochs):
        sam, out = train(pairs, cache, epochs, cfg=cfg)
        return decoder(sam), out

    reference, _ = run(None, 2)
    cache = EmbeddingCache(tmp_path, "fp32", {"weights": "w"})
    cold, m = run(cache, 2)  # epoch 0 fills the cache, epoch 1 reads it
    assert [x["cache_hits"] for x in m] == [0, 3]
    assert max_diff(cold, reference) <= 1e-6
    monkeypatch.setattr(type(new_sam().image_encoder), "forward", lambda *a: pytest.fail("encoder called"))
    warm, m = run(cache, 2)
    assert [x["cache_hits"] for x in m] == [3, 3]
    assert max_diff(warm, reference) <= 1e-6
    assert max_diff(warm, decoder(new_sam(0))) > 1e-4  # the clicks trained the decoder


# fp16 keeps 11 significant bits: embeddings move by up to ~5e-4 relative. Adam's first steps
# are close to sign(gradient), so a parameter whose gradient is near zero can step either way
# (single weights then differ by a whole step, lr); the measure is therefore the whole update:
# |update_fp16 - update_fp32| / |update_fp32| over the decoder (measured 0.05; bf16: 0.12),
# and the epoch losses (measured within 6e-4 relative).
FP16_UPDATE_TOL = 0.1
FP16_LOSS_TOL = 2e-3


def test_warm_fp16_cache_trains_a_close_decoder(pairs, reference, tmp_path):
    cache = EmbeddingCache(tmp_path, "fp16", {"weights": "w"})
    fill(pairs, cache)
    sam, m = train(pairs, cache)
    assert [x["cache_hits"] for x in m] == [3, 3]
    init, ours = decoder(new_sam(0)), decoder(sam)
    norm = lambda d: sum((v**2).sum() for v in d.values()).sqrt().item()  # noqa: E731
    update_diff = norm({k: ours[k] - reference[k] for k in ours}) / norm({k: reference[k] - init[k] for k in ours})
    assert 0 < update_diff <= FP16_UPDATE_TOL, update_diff
    _, ref_m = train(pairs, None)
    for a, b in zip(m, ref_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=FP16_LOSS_TOL)


# ------------------------------------------------------------------ run.py: log and metrics.jsonl


def test_run_logs_the_cache_and_counts_hits_per_epoch(tmp_path):
    root = tmp_path / "data"
    train_dir = make_synthetic_dataset(root / "train", n=4, size_range=(64, 120), seed=1)
    val_dir = make_synthetic_dataset(root / "val", n=2, size_range=(64, 120), seed=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = ["--checkpoint", "none", "--image_size", "64", "--num_workers", "0", "--train_dir", str(train_dir),
             "--val_dir", str(val_dir), "--dist", "False", "--batch_size", "2", "--cache_dir", str(tmp_path / "c")]
    logs, records = [], []
    for run, epochs in (("cold", 2), ("warm", 1)):
        proc = subprocess.run([sys.executable, str(REPO / "run.py"), *flags, "--epoch", str(epochs),
                               "--output_dir", str(tmp_path / run)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        logs.append(proc.stdout + proc.stderr)
        records += [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert f"embedding cache: {tmp_path / 'c'} (0 entries" in logs[0]
    assert f"embedding cache: {tmp_path / 'c'} (6 entries" in logs[1]
    # The base model's validation (epoch 0, --eval_base) already fills the validation entries.
    counts = [(r["cache_hits"], r["cache_misses"], r["val_cache_hits"], r["val_cache_misses"])
              for r in records if r["epoch"] > 0]
    assert counts == [(0, 4, 2, 0), (4, 0, 2, 0), (4, 0, 2, 0)]
    assert all(r["images_per_sec"] > 0 for r in records if r["epoch"] > 0)


def test_validation_chunks_encode_each_image_once_and_count_images(tmp_path, monkeypatch):
    """Validation in chunks (--max_objects smaller than the objects of an image): a cold cache
    encodes every image once, however its chunks fall into batches, hits and misses count
    images, not chunks, and an fp32 cache scores exactly as no cache."""
    root = make_synthetic_dataset(tmp_path / "multi", n=2, size_range=(90, 140), seed=5, objects=3)
    records = load_records(root)
    sam = new_sam(1)
    encoded = []
    forward = type(sam.image_encoder).forward
    monkeypatch.setattr(type(sam.image_encoder), "forward", lambda self, x: encoded.append(len(x)) or forward(self, x))

    def batches(cache):  # 3 chunks per image; batches [a0 a1] [a2 b0] [b1 b2] split both images
        ds = MaskDataset(records, SIZE, max_objects=1, train=False, cache=cache)
        items = [ds[i] for i in range(len(ds))]
        assert len(items) == 6 and [it["first_chunk"] for it in items] == [True, False, False] * 2
        return [items[0:2], items[2:4], items[4:6]]

    plain = evaluate(sam, batches(None), CPU, None)
    encoded.clear()
    cache = EmbeddingCache(tmp_path / "c", "fp32", {"weights": "w"})
    cold = evaluate(sam, batches(cache), CPU, None, cache=cache)
    # Items are built before any batch runs, so every chunk misses: still one encoder row per
    # image in a batch (a0 a1 -> 1 row; a2 b0 -> 2 rows; b1 b2 -> 1 row).
    assert sum(encoded) == 4 and cold["cache_hits"] == 0 and cache.usage()[0] == 2
    encoded.clear()
    warm = evaluate(sam, batches(cache), CPU, None, cache=cache)
    assert encoded == [] and warm["cache_hits"] == 2
    for key in ("loss", "iou", "dice"):
        assert cold[key] == pytest.approx(plain[key], abs=1e-6) and warm[key] == pytest.approx(plain[key], abs=1e-6)
