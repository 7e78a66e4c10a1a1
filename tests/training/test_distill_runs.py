"""run.py end to end with --distill and --l2sp: 2 gloo processes x batch 1 end with the weights of
1 process x batch 2 (each flag on, and both with LoRA), the terms change the training, appear in
the log and metrics.jsonl, and best.pth / last.pth hold no part of the frozen copy: best.pth
loads into a stock model. Helpers and tolerances are those of tests/test_run.py's synchronisation test."""

import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.utils.data import make_synthetic_dataset
from test_run import SIZE, assert_synchronised, base_flags, free_port, last_weights, max_diff, metrics, run_ok

# Strong weights, so the terms steer the steps. Both are 0 with a zero gradient on the first step
# (the model is still its base), so 4 images in global batches of 2: 2 steps an epoch, 2 epochs.
CASES = {
    "distill": dict(distill=10.0, distill_prompts=3),
    "l2sp": dict(l2sp=100.0),
    "lora_both": dict(distill=10.0, l2sp=100.0, lora_rank=2, no_cache=True),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return (make_synthetic_dataset(root / "train", n=4, size_range=(64, 128), seed=1, objects=2),
            make_synthetic_dataset(root / "val", n=2, size_range=(64, 128), seed=2, objects=2))


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "plain"
    run_ok(base_flags(*data, out, batch_size=2, epoch=2, dist="no"))
    return out


def assert_stock_files(run):
    """best.pth loads into a stock model and holds nothing else; last.pth holds the trained tensors
    only (LoRA factors under their layers' names): no part of the frozen copy in either."""
    stock = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    keys = set(stock.state_dict())
    best = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert best["model"] and set(best["model"]) <= keys
    assert not stock.load_state_dict(best["model"], strict=False).unexpected_keys
    last = last_weights(run)
    assert set(last) <= keys | {k for k in last if k.endswith((".lora_A", ".lora_B"))}
    return best


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_like_one_with_the_term_on(data, plain_run, tmp_path, case):
    flags = CASES[case]
    one, two = tmp_path / "p1_b2", tmp_path / "p2_b1"
    run_ok(base_flags(*data, one, batch_size=2, epoch=2, dist="no", **flags))
    run_ok(base_flags(*data, two, batch_size=1, epoch=2, world_size=2, port=free_port(), **flags))
    a, b = last_weights(one), last_weights(two)
    # l2sp = 100 scales the rounding of near-zero updates up: measured 1 weight 8.3e-5 apart.
    assert_synchronised(a, b, outliers=3)
    terms = [f"loss_{name}" for name in ("distill", "l2sp") if name in flags]
    for x, y in zip(metrics(one), metrics(two), strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        for split in ("train", "val"):
            for term in terms:
                key = f"{split}_{term}"
                assert x[key] > 0 and x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-9), key
    if "lora_rank" not in flags:  # the same trained tensors as the plain run: the term moved them
        assert max_diff(a, last_weights(plain_run)) > 1e-5
    log = (one / "train.log").read_text()
    assert all(f" {t[5:]} " in log for t in terms)  # "(bce ... distill 0.012 l2sp 0.104)"
    best = assert_stock_files(one)
    assert best["args"]["distill"] == flags.get("distill", 0.0)
