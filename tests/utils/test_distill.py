"""The terms that keep the starting model (utils.distill): the distance and L2-SP against values
worked out by hand, the off-target prompts' seeding, the distill term of a training step against
an independent per-prompt decode, and where the base side's embeddings come from under LoRA and
a trained encoder. vit_t with random weights at a 128-pixel input."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from segment_anything import sam_model_registry
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import MaskDataset, load_records, make_synthetic_dataset
from segment_anything.utils.data.prompts import off_target_prompts
from segment_anything.utils.distill import Anchor, l2sp_distance, off_target_distance
from segment_anything.utils.losses import DEFAULT_LOSS_SPEC, LossSpec, parse_loss
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure, set_train_mode
from segment_anything.utils.trainer import PromptLoop, SamTrainStep, prepare_batch, score
from segment_anything.utils.transforms import ResizeLongestSide

SIZE = 128
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def spec(distill: float = 0.0, l2sp: float = 0.0, prompts: int = 4) -> LossSpec:
    return LossSpec(parse_loss("bce=1,iou=1,iou_head=1"), distill=distill, distill_prompts=prompts, l2sp=l2sp)


def new_sam(plan: TrainPlan = TrainPlan(), seed: int = 0):
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    randomize_(sam.image_encoder, seed=seed)
    configure(sam, plan)
    return sam


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=2, size_range=(70, 200), seed=5, objects=2)
    return load_records(root)


# ----------------------------------------------------------------------------- by hand


def test_off_target_distance_by_hand():
    """Grid 4 x 4 over a 16-pixel input. Item 0 is 16 x 8 (rows 0-3, columns 0-1 of the grid are
    the image), item 1 is 8 x 16 (rows 0-1): differences in the padding must not count."""
    base = torch.zeros(3, 1, 4, 4)
    tuned = torch.full((3, 1, 4, 4), 100.0)  # the padding
    tuned[0, 0, :, :2] = 2.0  # item 0: squared 4 on all 8 pixels -> 4
    tuned[1, 0, 0, :] = 1.0  # item 1, prompt 1: rows 1 and 9 -> 5
    tuned[1, 0, 1, :] = 3.0
    tuned[2, 0, :2, :] = 0.0  # item 1, prompt 2: 0
    got = off_target_distance(tuned, base, torch.tensor([0, 1, 1]), [(16, 8), (8, 16)], 16)
    assert got.tolist() == [4.0, 2.5]


def test_l2sp_by_hand():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight += torch.tensor([[3.0, -1.0]])
        model.bias -= 2.0
    assert l2sp_distance(model, start).item() == 9 + 1 + 4
    assert l2sp_distance(model, {"bias": start["bias"]}).item() == 4  # only the captured (trained) ones


def test_l2sp_with_lora_is_the_adapter_factors_distance_to_their_start():
    sam = new_sam(TrainPlan(parts=(), lora_rank=2))
    anchor = Anchor(spec(l2sp=1.0))
    anchor.capture(sam)
    assert anchor.start and all(n.endswith((".lora_A", ".lora_B")) for n in anchor.start)
    assert not any(n.endswith(".lora_B") and v.any() for n, v in anchor.start.items())  # B starts at 0
    assert l2sp_distance(sam, anchor.start).item() == 0.0
    a_name, b_name = "image_encoder.layers.1.blocks.0.attn.qkv.lora_A", "image_encoder.layers.1.blocks.0.attn.qkv.lora_B"
    params = dict(sam.named_parameters())
    with torch.no_grad():
        params[b_name][3, 1] += 0.5
        params[a_name][0, 2] -= 0.25
    assert l2sp_distance(sam, anchor.start).item() == pytest.approx(0.25 + 0.0625, abs=1e-7)


# ----------------------------------------------------------------------------- the prompts


def test_off_target_prompts_lie_in_the_image_half_boxes_half_points():
    boxes, points = off_target_prompts((50, 80), 5, np.random.default_rng(0))
    assert boxes.shape == (3, 4) and points.shape == (2, 2)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (w >= 8 - 1e-4).all() and (w <= 40 + 1e-4).all() and (h >= 5 - 1e-4).all() and (h <= 25 + 1e-4).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 50).all()
    assert (points >= 0).all() and (points[:, 0] < 80).all() and (points[:, 1] < 50).all()


def test_off_target_prompts_are_seeded_per_image_and_epoch_and_leave_the_training_draws_alone(records):
    plain = MaskDataset(records, SIZE, seed=3)
    with_off = MaskDataset(records, SIZE, seed=3, off_target=4)
    a, b = with_off[(1, 2)], with_off[(1, 2)]
    assert a["off_boxes"].shape == (2, 4) and a["off_points"].shape == (2, 2)
    assert torch.equal(a["off_boxes"], b["off_boxes"]) and torch.equal(a["off_points"], b["off_points"])
    assert not torch.equal(a["off_boxes"], with_off[(1, 3)]["off_boxes"])
    assert not torch.equal(a["off_boxes"], with_off[(0, 2)]["off_boxes"])
    ref = plain[(1, 2)]
    for key in ("boxes", "points", "masks", "objects"):
        assert torch.equal(ref[key], a[key])
    val = MaskDataset(records, SIZE, seed=3, off_target=4, train=False, max_objects=1)
    assert torch.equal(val[0]["off_boxes"], val[1]["off_boxes"])  # chunks of one image share them


# ----------------------------------------------------------------------------- the step


def single_decode(prompt_encoder, mask_decoder, embedding, box=None, point=None):
    """One prompt, one image, the decoder's stock call (no image_index)."""
    points = None if point is None else (point[None, None], torch.ones(1, 1))
    sparse, dense = prompt_encoder(points=points, boxes=None if box is None else box[None], masks=None)
    low, _ = mask_decoder(image_embeddings=embedding[None], image_pe=prompt_encoder.get_dense_pe(),
                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return low[0, 0]


@pytest.mark.parametrize("plan", [TrainPlan(), TrainPlan(parts=("mask_decoder",), lora_rank=2)], ids=["decoder", "lora"])
def test_distill_term_of_a_step_against_one_decode_per_prompt(records, plan):
    """At the start the term is exactly 0 (with LoRA too, where the base side is its own encoder
    pass: rounding noise there would be scaled up by Adam), then it is the per-prompt MSE."""
    sam = new_sam(plan)
    set_train_mode(sam)
    start = copy.deepcopy(sam)
    loss = spec(distill=3.0)
    anchor = Anchor(loss)
    anchor.capture(sam)
    loop = PromptLoop(loss, anchor=anchor)
    items = [MaskDataset(records, SIZE, seed=1, off_target=4)[(i, 0)] for i in range(2)]
    batch = prepare_batch(items, sam, CPU)
    terms, _ = loop.train_step(SamTrainStep(sam), sam, batch, items, None, None, 0, 0)
    assert terms["loss_distill"].abs().max().item() == 0  # the starting model is its own base, bit for bit

    torch.manual_seed(1)
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    step = SamTrainStep(sam)
    terms, _ = loop.train_step(step, sam, batch, items, None, None, 0, 0)
    plain = score(sam, batch, *step(batch.images, *batch.prompts()), loss)
    transform = ResizeLongestSide(SIZE)
    with torch.no_grad():
        expected = []
        for i, it in enumerate(items):
            emb = start.image_encoder(batch.images[i : i + 1])[0]
            h, w = (round(s * 32 / SIZE) for s in it["input_size"])
            prompts = [dict(box=b) for b in transform.apply_boxes_torch(it["off_boxes"], it["original_size"])]
            prompts += [dict(point=p) for p in transform.apply_coords_torch(it["off_points"], it["original_size"])]
            per = [((single_decode(sam.prompt_encoder, sam.mask_decoder, emb, **p)
                     - single_decode(start.prompt_encoder, start.mask_decoder, emb, **p))[:h, :w] ** 2).mean() for p in prompts]
            expected.append(torch.stack(per).mean())
    want = torch.stack(expected)[batch.image_index]
    assert want.min() > 1e-4
    torch.testing.assert_close(terms["loss_distill"], want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["loss"], plain["loss"] + 3.0 * want, rtol=1e-4, atol=1e-6)
    assert terms["loss_distill"].requires_grad


def test_step_terms_are_the_loss_specs_keys_and_l2sp_is_weighted_in(records):
    sam = new_sam()
    loss = spec(distill=1.0, l2sp=2.0)
    anchor = Anchor(loss)
    anchor.capture(sam)
    with torch.no_grad():
        sam.mask_decoder.iou_token.weight.add_(0.5)  # 256 entries moved by 0.5: l2sp = 64
    items = [MaskDataset(records, SIZE, seed=1, off_target=2)[(0, 0)]]
    batch = prepare_batch(items, sam, CPU)
    step = SamTrainStep(sam)
    terms, _ = PromptLoop(loss, anchor=anchor).train_step(step, sam, batch, items, None, None, 0, 0)
    assert set(loss.keys()) <= set(terms) and loss.keys()[-2:] == ("loss_distill", "loss_l2sp")
    torch.testing.assert_close(terms["loss_l2sp"], torch.full_like(terms["loss_l2sp"], 64.0))
    plain = score(sam, batch, *step(batch.images, *batch.prompts()), loss)
    torch.testing.assert_close(terms["loss"], plain["loss"] + terms["loss_distill"] + 2.0 * 64.0)
    assert DEFAULT_LOSS_SPEC.keys() == ("loss", "loss_bce", "loss_iou", "loss_iou_head")


@pytest.mark.parametrize("plan", [TrainPlan(parts=("mask_decoder",), lora_rank=2),
                                  TrainPlan(parts=("mask_decoder", "image_encoder"))], ids=["lora", "encoder"])
def test_base_side_reads_the_starting_encoder_when_the_encoder_trains(records, plan):
    sam = new_sam(plan)
    reference = new_sam()  # the same starting weights, no adapters
    anchor = Anchor(spec(distill=1.0))
    anchor.capture(sam)
    assert (anchor.image_encoder is None) == bool(plan.lora_rank)  # LoRA: no copy, the adapters switched off
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    items = [MaskDataset(records, SIZE, seed=1, off_target=2)[(0, 0)]]
    images = prepare_batch(items, sam, CPU).images
    sam.eval()
    with torch.no_grad():
        tuned = sam.image_encoder(images)
        want = reference.eval().image_encoder(images)
    base = anchor.base_embeddings(sam, images, tuned)
    assert (tuned - want).abs().max() > 1e-3
    torch.testing.assert_close(base, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sam.image_encoder(images), tuned)  # the adapters are back on


# ----------------------------------------------------------------------------- the flags


@pytest.mark.parametrize("flags, message", [
    (dict(distill=-1.0), "--distill must be finite and >= 0"),
    (dict(l2sp=float("inf")), "--l2sp must be finite and >= 0"),
    (dict(distill=1.0, distill_prompts=0), "--distill_prompts must be >= 1"),
    (dict(distill=1.0, task="semantic"), "--task semantic trains a new head"),
    (dict(l2sp=1.0, prompt="point"), "not interactive training"),
    (dict(distill=1.0, prompt="mixed"), "not interactive training"),
])
def test_bad_or_unsupported_flags_are_one_line(flags, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(train_dir="x", **flags)
    assert len(str(err.value).splitlines()) == 2  # "invalid configuration:" and the one problem


def test_flags_resolve_into_the_loss_spec():
    loss = TrainConfig(train_dir="x", distill=0.5, distill_prompts=6, l2sp=0.1, prompt="point", multimask=False).resolve().loss
    assert (loss.distill, loss.distill_prompts, loss.l2sp) == (0.5, 6, 0.1)
    assert TrainConfig(train_dir="x").resolve().loss.keys() == DEFAULT_LOSS_SPEC.keys()
