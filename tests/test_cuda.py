"""The CUDA-only paths, each against the float32 eager step on the same device: AMP fp16 with the
grad scaler, bf16, pinned memory with loader workers, the embedding cache from CUDA tensors, the
compiled decoder step. Skipped without CUDA; bench/gpu_check.sh runs them. SAM_TEST_DEVICE=cpu
runs what has a CPU meaning (a check of the tests themselves)."""

import os

import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.training.compile import compile_decode
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.data.cache import EmbeddingCache
from segment_anything.utils.data.dataset import collate
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure
from segment_anything.utils.trainer import SamTrainStep, train_one_epoch

DEVICE = torch.device(os.environ.get("SAM_TEST_DEVICE", "cuda"))
SIZE = 256
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    """No TF32: the float32 reference must be float32."""
    if DEVICE.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    else:
        yield


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("cuda") / "train", n=4, size_range=(80, 160), seed=4, objects=2)
    return load_records(root)


def new_sam():
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    randomize_(sam, seed=0)
    configure(sam, TrainPlan())
    return sam.to(DEVICE)


def fit(records, amp_dtype=None, workers=0, pin=False, cache=None, compiled=False, epochs=2):
    """epochs of train_one_epoch over the 4 images in batches of 2; returns (decoder state, metrics)."""
    sam = new_sam()
    step = SamTrainStep(sam)
    if compiled:
        step = compile_decode(step)
    ds = MaskDataset(records, SIZE, cache=cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=workers, pin_memory=pin,
                                         persistent_workers=workers > 0)
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # 2**10, not the default 2**16: the default's first steps overflow and are skipped (as they
    # should be), which would make the fp16 run train fewer steps than the float32 reference.
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, enabled=amp_dtype == torch.float16)
    metrics = [train_one_epoch(step, sam, loader, opt, sched, scaler, DEVICE, amp_dtype, cache=cache, epoch=e)
               for e in range(epochs)]
    state = {k: v.detach().float().cpu() for k, v in sam.state_dict().items() if k.startswith("mask_decoder.")}
    return state, metrics, scaler, step


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(records):
    return fit(records)


def test_reference_trains(reference):
    _, metrics, _, _ = reference
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mixed_precision_trains_close_to_float32(records, reference, dtype):
    state, metrics, scaler, _ = fit(records, amp_dtype=dtype)
    ref_state, ref_metrics, _, _ = reference
    for m, r in zip(metrics, ref_metrics):
        assert m["loss"] == pytest.approx(r["loss"], rel=0.05)
    # Not the weights themselves: AdamW moves a weight whose gradient is near zero by lr in the
    # direction of its sign, which rounding can flip. The second epoch's loss measures them.
    assert all(torch.isfinite(v).all() for v in state.values()) and max_diff(state, ref_state) > 0
    if dtype == torch.float16:
        assert scaler.is_enabled() and scaler.get_scale() == 2.0**10  # no step skipped


def test_pinned_memory_and_loader_workers_train_as_the_main_process(records, reference):
    pin = DEVICE.type == "cuda"
    state, _, _, _ = fit(records, workers=2, pin=pin)
    assert max_diff(state, reference[0]) <= 1e-6
    if pin:
        loader = torch.utils.data.DataLoader(MaskDataset(records, SIZE), batch_size=2, collate_fn=collate,
                                             num_workers=2, pin_memory=True)
        assert next(iter(loader))[0]["image"].is_pinned()


def test_the_embedding_cache_stores_device_tensors_and_trains_the_same(records, reference, tmp_path):
    cache = EmbeddingCache(tmp_path, "fp32", {"weights": "w"})
    state, metrics, _, _ = fit(records, cache=cache)
    assert [m["cache_hits"] for m in metrics] == [0, 4] and cache.usage()[0] == 4
    assert max_diff(state, reference[0]) <= 1e-5


def test_the_compiled_step_trains_as_the_eager_one(records, reference, tmp_path):
    cache = EmbeddingCache(tmp_path, "fp32", {"weights": "w"})
    eager, _, _, _ = fit(records, cache=EmbeddingCache(tmp_path / "eager", "fp32", {"weights": "w"}), epochs=3)
    state, metrics, _, step = fit(records, cache=cache, compiled=True, epochs=3)
    assert step.decode.failed is None, f"torch.compile failed: {step.decode.failed!r}"
    assert max_diff(state, eager) <= 1e-4
