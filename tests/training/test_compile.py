"""--compile (training/compile.py): the compiled decoder step trains as the eager one, falls back
with a warning when compiling fails, is refused before any worker starts when it cannot work,
and works under DDP (2 gloo ranks).

vit_t with random weights at a 128-pixel input, as tests/utils/test_trainer.py. Compiling takes
tens of seconds on 2 cores (inductor builds C++ kernels), so the tests compile few graphs.
"""

import json
import sys
import textwrap

import pytest
import torch

from conftest import REPO, run_ranks
from segment_anything import sam_model_registry
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.training.compile import CompiledOrEager, compile_decode, cpu_compiler
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure
from segment_anything.utils.trainer import SamTrainStep, train_one_epoch

SIZE = 128
CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="no C++ compiler: torch inductor cannot build CPU kernels")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Two batches with different prompt counts (1 and 3): the dynamic dimension."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=3, size_range=(70, 200), seed=5)
    ds = MaskDataset(load_records(root), SIZE)
    items = [ds[i] for i in range(3)]
    h, w = items[2]["original_size"]
    items[2] = dict(items[2], masks=items[2]["masks"].repeat(2, 1, 1),
                    boxes=torch.cat([items[2]["boxes"], torch.tensor([[0.0, 0.0, w, h]])]))
    return [items[:1], items[1:]]


def new_sam():
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    randomize_(sam.image_encoder, seed=0)
    configure(sam, TrainPlan())
    return sam


def train(step, sam, batches):
    """Per-step losses and the mask decoder's parameters after train_one_epoch over batches.
    Plain SGD: AdamW's first steps move every weight by about +-lr whatever the gradient's size,
    so a rounding-level gradient difference near zero would show as a 2 lr weight difference."""
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses = []

    class Record:
        def step(self, images, loss):
            losses.append(loss.item())

    train_one_epoch(step, sam, batches, opt, sched, torch.amp.GradScaler("cpu", enabled=False), CPU, None,
                    progress=Record())
    return losses, {k: v.detach().clone() for k, v in sam.mask_decoder.state_dict().items()}


@needs_compiler
def test_compiled_step_trains_as_the_eager_step(batches):
    eager_losses, eager_weights = train(SamTrainStep(sam := new_sam()), sam, batches)
    step = compile_decode(SamTrainStep(sam := new_sam()))
    losses, weights = train(step, sam, batches)
    assert step.decode.failed is None, f"compilation fell back to eager: {step.decode.failed!r}"
    # Inductor fuses and reorders float32 sums: equal up to rounding, not bit for bit.
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(weights[k], new_sam().mask_decoder.state_dict()[k]) for k in weights)  # it trained


def test_a_failed_compilation_warns_and_runs_eagerly(monkeypatch, caplog):
    def broken(fn, **kw):
        def call(*args, **kwargs):
            raise RuntimeError("no compiler here\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    wrapped = CompiledOrEager(lambda x: x * 2)
    with caplog.at_level("WARNING"):
        assert wrapped(torch.tensor(3.0)).item() == 6.0 and wrapped(torch.tensor(1.0)).item() == 2.0
    warnings = [r.getMessage() for r in caplog.records if "--compile" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: no compiler here" in warnings[0], warnings


def test_compile_is_refused_without_a_compiler_or_with_interactive_training(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ValueError, match="--compile needs a C\\+\\+ compiler"):
        TrainConfig(compile=True, device="cpu")
    assert TrainConfig(device="cpu").compile is False  # off: no check
    monkeypatch.setenv("CXX", sys.executable)  # the check only asks that the program exists
    assert TrainConfig(compile=True, device="cpu").compile is True
    with pytest.raises(ValueError, match="interactive training"):
        TrainConfig(compile=True, device="cpu", click_rounds=2)


RANK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from test_compile import new_sam, train, batches_for
    from segment_anything.training.compile import compile_decode
    from segment_anything.utils.distributed import destroy_distributed, init_distributed
    from segment_anything.utils.trainer import SamTrainStep

    rank, port, data = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    info = init_distributed("cpu", rank, rank, 2, f"tcp://127.0.0.1:{port}")
    batches = batches_for(data, rank)
    out = {}
    for name in ("eager", "compiled"):
        sam = new_sam()
        step = SamTrainStep(sam)
        if name == "compiled":
            compile_decode(step)
        ddp = DDP(step)
        losses, weights = train(ddp, sam, batches)
        out[name] = {"losses": losses, "weights": {k: v.tolist() for k, v in weights.items()}}
        if name == "compiled":
            out["failed"] = repr(step.decode.failed)
        del ddp
        gc.collect()
    destroy_distributed()
    print("RESULT " + json.dumps(out))
    """
)


def batches_for(data: str, rank: int):
    """Rank 0: one image with one prompt per step; rank 1: one image with two prompts per step."""
    ds = MaskDataset(load_records(data), SIZE)
    items = [ds[i] for i in range(3)]
    if rank == 1:
        items = [dict(it, masks=it["masks"].repeat(2, 1, 1), boxes=it["boxes"].repeat(2, 1)) for it in items[1:]]
    return [[it] for it in items[:2]]


@needs_compiler
def test_compiled_step_under_ddp_matches_eager_ddp(tmp_path):
    data = make_synthetic_dataset(tmp_path / "train", n=3, size_range=(70, 200), seed=5)
    # The rank script imports this module's helpers (and this module conftest's REPO).
    results = run_ranks(RANK_SCRIPT, tmp_path, data, timeout=600, pythonpath=(REPO, REPO / "tests", REPO / "tests" / "training"))
    for r in results:
        assert r["failed"] == "None"
        assert r["compiled"]["losses"] == pytest.approx(r["eager"]["losses"], rel=1e-4)
    # DDP averaged the gradients: both ranks hold the same weights, eager and compiled alike.
    for key, value in results[0]["eager"]["weights"].items():
        for r in results:
            torch.testing.assert_close(torch.tensor(r["compiled"]["weights"][key]), torch.tensor(value),
                                       rtol=1e-4, atol=1e-5, msg=key)
