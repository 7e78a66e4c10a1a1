"""Tests for utils/interactive.py and utils/click_eval.py: the minimum loss over multimask
outputs, corrective clicks, click rounds with the mask prompt, mixed prompts, click validation.

vit_t with random weights at a 128-pixel input, as tests/utils/test_trainer.py.
"""

import numpy as np
import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.click_eval import click_keys, click_metrics
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.interactive import (
    InteractiveSpec, InteractiveStep, Prompts, mixed_choice, min_loss_select, parse_prompt_probs, step_prompts,
)
from segment_anything.utils.losses import DEFAULT_LOSS_SPEC, LossSpec, parse_loss
from segment_anything.utils.clicks import corrective_click, next_clicks, random_click
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure
from segment_anything.utils.batch import prepare_batch

SIZE = 128
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=2, size_range=(70, 150), seed=5)
    return MaskDataset(load_records(root), SIZE)


def new_sam(multimask: bool = True):
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    randomize_(sam.image_encoder, seed=0)
    configure(sam, TrainPlan(prompt="mixed", multimask=multimask, mask_prompt=True))
    return sam


# ----------------------------------------------------------------------------- minimum loss


def test_min_loss_picks_the_lowest_loss_mask_and_only_it_gets_gradient():
    """Two prompts x four tokens of hand-built 4x4 logits. Prompt 0 is a single point: of the
    multimask tokens 1..3, token 2 equals the target (a confident match), token 1 is its inverse
    and token 3 is undecided (all zero logits), so token 2 has the lowest loss. Prompt 1 is not
    a single point: token 0, although token 3 would match better."""
    target = torch.zeros(2, 4, 4)
    target[:, 1:3, 1:3] = 1
    match = (target[0] * 2 - 1) * 8  # +8 inside, -8 outside
    logits = torch.stack([torch.stack([torch.zeros(4, 4), -match, match, torch.zeros(4, 4)]),
                          torch.stack([-match, torch.zeros(4, 4), torch.zeros(4, 4), match])]).requires_grad_()
    iou_pred = torch.full((2, 4), 0.5, requires_grad=True)
    spec = DEFAULT_LOSS_SPEC
    flat = spec(logits.flatten(0, 1), target.repeat_interleave(4, 0), iou_pred.flatten())
    terms = {k: v.view(2, 4) for k, v in flat.items()}
    out, choice = min_loss_select(terms, torch.tensor([True, False]), dict(spec.weights))
    assert choice.tolist() == [2, 0]
    mask_part = terms["loss"] - terms["loss_iou_head"]  # weight 1
    assert mask_part[0, 2] < mask_part[0, 1] and mask_part[0, 2] < mask_part[0, 3]
    # The chosen mask's terms; the IoU-head term is the mean over the three multimask tokens.
    assert out["loss_bce"][0] == terms["loss_bce"][0, 2]
    assert torch.allclose(out["loss_iou_head"][0], terms["loss_iou_head"][0, 1:].mean())
    assert torch.allclose(out["loss"][0], mask_part[0, 2] + terms["loss_iou_head"][0, 1:].mean())
    assert out["loss"][1] == terms["loss"][1, 0]
    out["loss"].sum().backward()
    has_grad = logits.grad.flatten(2).abs().sum(2) > 0
    assert has_grad.tolist() == [[False, False, True, False], [True, False, False, False]]
    head_grad = iou_pred.grad.abs() > 0
    assert head_grad.tolist() == [[False, True, True, True], [True, False, False, False]]


def test_min_loss_with_the_single_mask_only_passes_token_zero_through():
    terms = {"loss": torch.tensor([[0.3], [0.1]]), "loss_bce": torch.tensor([[0.3], [0.1]])}
    out, choice = min_loss_select(terms, torch.tensor([False, False]), parse_loss("bce=1"))
    assert choice.tolist() == [0, 0] and out["loss"].tolist() == pytest.approx([0.3, 0.1])


# ----------------------------------------------------------------------------- clicks


@pytest.mark.parametrize("mode", ["center", "random"])
def test_a_corrective_click_lands_in_the_error_region_it_names(mode):
    rng = np.random.default_rng(0)
    labels_seen = set()
    for case in range(40):
        target = np.zeros((24, 30), bool)
        pred = np.zeros((24, 30), bool)
        y0, x0 = rng.integers(0, 12, 2)
        target[y0:y0 + rng.integers(3, 12), x0:x0 + rng.integers(3, 18)] = True
        y1, x1 = rng.integers(0, 12, 2)
        pred[y1:y1 + rng.integers(1, 12), x1:x1 + rng.integers(1, 18)] = True
        click = corrective_click(pred, target) if mode == "center" else random_click(pred, target, rng)
        (x, y), label = click
        missed, extra = target & ~pred, pred & ~target
        region = missed if label == 1 else extra
        assert region[int(y), int(x)], (case, label)
        assert label == int(missed.sum() >= extra.sum())  # the larger region
        labels_seen.add(label)
    assert labels_seen == {0, 1}
    xy, labels = next_clicks([torch.ones(1, 5, 5, dtype=torch.bool)], [torch.ones(1, 5, 5, dtype=torch.bool)], mode,
                             [np.random.default_rng(0)])
    assert labels.tolist() == [-1]  # exact: no click


# ----------------------------------------------------------------------------- rounds


def test_click_rounds_feed_each_rounds_output_logits_back_as_the_next_mask_prompt(dataset):
    sam = new_sam()
    spec = InteractiveSpec(seed=3, click_rounds=3)
    step = InteractiveStep(sam, spec, DEFAULT_LOSS_SPEC)
    step.keep_trace = True
    items = [dataset[0], dataset[1]]
    batch = prepare_batch(items, sam, CPU)
    p = batch.image_index.numel()
    terms = step(batch.images, batch, [(it["index"], j) for it in items for j in range(len(it["masks"]))], 0, 3)
    trace = step.trace
    assert len(trace) == 5  # the first prediction, 3 clicks, the mask-only round
    assert trace[0].mask_input is None
    for r in range(1, 5):
        assert torch.equal(trace[r].mask_input, trace[r - 1].logits), r  # round 2's prompt is round 1's output
    assert [t.labels.shape[1] for t in trace] == [0, 1, 2, 3, 3]  # one click per click round, none after
    assert ((trace[3].labels == 0) | (trace[3].labels == 1)).any()
    assert set(terms) == set(DEFAULT_LOSS_SPEC.keys()) | {"iou", "dice"} and terms["loss"].shape == (p,)
    terms["loss"].sum().backward()
    # Every trained parameter has a gradient (none outside the graph to stall DDP), the mask
    # path of the prompt encoder is used, and the multimask heads train.
    for name, param in sam.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name


def test_click_grad_last_back_propagates_the_last_round_only(dataset):
    sam = new_sam()
    items = [dataset[0]]
    batch = prepare_batch(items, sam, CPU)
    keys = [(0, j) for j in range(len(items[0]["masks"]))]
    full = InteractiveStep(sam, InteractiveSpec(click_rounds=2), DEFAULT_LOSS_SPEC)(batch.images, batch, keys, 0, 2)
    last = InteractiveStep(sam, InteractiveSpec(click_rounds=2, click_grad="last"), DEFAULT_LOSS_SPEC)(
        batch.images, batch, keys, 0, 2)
    assert torch.all(full["loss"] > last["loss"])  # all: the sum over four rounds; last: one round
    assert torch.equal(full["iou"], last["iou"])  # metrics of the first prediction in both


def test_round_count_is_the_same_for_every_rank_and_varies_by_step():
    spec = InteractiveSpec(seed=7, click_rounds=8)
    draws = [spec.rounds(1, s) for s in range(40)]
    assert draws == [InteractiveSpec(seed=7, click_rounds=8).rounds(1, s) for s in range(40)]
    assert min(draws) >= 1 and max(draws) <= 8 and len(set(draws)) > 3
    assert InteractiveSpec(click_rounds=0).rounds(0, 0) == 0


# ----------------------------------------------------------------------------- mixed prompts


def test_prompt_probs_parse_and_name_what_is_wrong():
    assert parse_prompt_probs("box=1,point=3") == {"box": 0.25, "point": 0.75}
    for bad in ("box=0.5,cat=0.5", "box=-1", "box=0,point=0", "box=x"):
        with pytest.raises(ValueError, match="--prompt_probs"):
            parse_prompt_probs(bad)


def test_mixed_choice_is_seeded_per_object_and_follows_the_probabilities():
    spec = InteractiveSpec(seed=1, mixed=(0.25, 0.75), num_points=3)
    keys = [(i, j) for i in range(50) for j in range(8)]
    use_box, count = mixed_choice(spec, 2, keys)
    again = mixed_choice(spec, 2, keys[::-1])
    assert np.array_equal(use_box, again[0][::-1]) and np.array_equal(count, again[1][::-1])  # per object
    assert abs(use_box.mean() - 0.25) < 0.06 and set(count.tolist()) == {1, 2, 3}
    assert not np.array_equal(use_box, mixed_choice(spec, 3, keys)[0])  # a fresh choice each epoch


def test_step_prompts_keep_a_box_or_the_first_k_points():
    class B:  # the fields of utils.batch.Batch that step_prompts reads
        image_index = torch.zeros(200, dtype=torch.long)
        boxes = torch.ones(200, 4)
        points = torch.zeros(200, 3, 2)
        point_labels = torch.tensor([[1.0, 1.0, 0.0]]).repeat(200, 1)

    spec = InteractiveSpec(mixed=(0.5, 0.5), num_points=2)
    prompts = step_prompts(B, spec, 0, [(0, j) for j in range(200)])
    assert 50 < prompts.use_box.sum() < 150
    box_rows, point_rows = prompts.labels[prompts.use_box], prompts.labels[~prompts.use_box]
    assert (box_rows == -1).all()  # a box object: its box only
    assert ((point_rows[:, 0] == 1) & (point_rows[:, 2] == 0)).all()
    assert set(point_rows[:, 1].tolist()) == {1.0, -1.0}  # 1 or 2 positive points
    single = prompts.single_point()
    assert not single.any()  # the negative point makes none of them a single point


# ----------------------------------------------------------------------------- validation


def test_click_metrics_from_a_point_and_a_box(dataset):
    sam = new_sam().eval()
    items = [dataset[0], dataset[1]]
    batch = prepare_batch(items, sam, CPU)
    with torch.no_grad():
        embeddings = sam.image_encoder(batch.images)
    out = click_metrics(sam, batch, embeddings, (1, 3))
    assert sorted(out) == sorted(click_keys((1, 3)))
    for value in out.values():
        assert value.shape == (batch.image_index.numel(),) and ((value >= 0) & (value <= 1)).all()


def test_each_prompt_decodes_as_at_inference_whatever_shares_its_batch():
    """decode_all gives a prompt the tokens SamPredictor would: a prompt's output must not depend
    on the other prompts of the batch (else 1 process x batch 4 and 2 x batch 2 differ), and a
    point prompt with padding slots equals the same points given alone, padding removed."""
    from segment_anything.utils.interactive import decode_all

    sam = new_sam().eval()
    emb = torch.randn(1, 256, 8, 8, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([10.0, 20.0, 90.0, 100.0])
    pts = torch.tensor([[30.0, 40.0], [60.0, 70.0], [0.0, 0.0], [80.0, 30.0]])
    # box; box + one click in slot 3; 1 point (slots 1-3 padding); 2 points and a negative click
    labels = torch.tensor([[-1, -1, -1, -1], [-1, -1, -1, 0], [1, -1, -1, -1], [1, 1, -1, 0]], dtype=torch.float32)
    full = Prompts(box.repeat(4, 1), torch.tensor([True, True, False, False]), pts.repeat(4, 1, 1), labels,
                   torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        low, iou = decode_all(sam, emb, full, None)
        for j in range(4):
            keep = labels[j] != -1
            alone = Prompts(full.boxes[j:j + 1], full.use_box[j:j + 1], pts[keep][None], labels[j][keep][None],
                            full.image_index[j:j + 1])
            low1, iou1 = decode_all(sam, emb, alone, None)
            torch.testing.assert_close(low[j:j + 1], low1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[j:j + 1], iou1, atol=1e-5, rtol=1e-5)
        # The 1-point prompt is SAM's point layout: the point plus one padding point, no box.
        sparse, dense = sam.prompt_encoder(points=(pts[:1][None], labels[2, :1][None]), boxes=None, masks=None)
        direct = sam.mask_decoder.predict_masks(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense)
        torch.testing.assert_close(low[2:3], direct[0], atol=1e-5, rtol=1e-5)
