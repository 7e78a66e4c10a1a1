"""What trains (utils/trainable.py): parts, never-used parameters, modes, LoRA export, counts.

vit_t with random weights at a 128-pixel input, one training step per case.
"""

import pytest
import torch

from conftest import REPO
from segment_anything import sam_model_registry
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import MaskDataset, load_records
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import load_partial_weight, save_partial_weight
from segment_anything.utils.trainable import (
    PARTS, TrainPlan, configure, export_weights, lora_metadata, never_used, parameter_counts, parameter_report,
    parse_parts, set_train_mode,
)
from segment_anything.utils.batch import prepare_batch
from segment_anything.utils.trainer import SamTrainStep, score, step_loss

SIZE = 128
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=2, size_range=(90, 160), seed=3)
    ds = MaskDataset(load_records(root), SIZE)
    return [ds[0], ds[1]]


def new_sam(model_type="vit_t", seed=0):
    torch.manual_seed(seed)
    sam = sam_model_registry[model_type](checkpoint=None, image_size=SIZE)
    return randomize_(sam, seed=seed) if model_type == "vit_t" else sam


def one_step(sam, items, lr=1e-2):
    """One training step (box prompts) with SGD; returns the gradients by parameter name."""
    set_train_mode(sam)
    batch = prepare_batch(items, sam, CPU)
    low_res, iou_pred = SamTrainStep(sam)(batch.images, *batch.prompts())
    step_loss(score(sam, batch, low_res, iou_pred), CPU).backward()
    grads = {n: p.grad for n, p in sam.named_parameters()}
    with torch.no_grad():
        for p in sam.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return grads


def test_parse_parts():
    assert parse_parts("mask_decoder") == ("mask_decoder",)
    assert parse_parts("mask_decoder, prompt_encoder") == ("prompt_encoder", "mask_decoder")
    assert parse_parts("all") == PARTS
    with pytest.raises(ValueError, match="unknown part"):
        parse_parts("decoder")


def test_never_used_is_exactly_what_gets_no_gradient_with_box_prompts(items):
    """Everything trainable, box prompts, single masks: the parameters without a (non-zero)
    gradient are exactly never_used() -- so the list is neither too short (DDP would stall)
    nor too long (something that could learn would be frozen)."""
    sam = new_sam()
    sam.requires_grad_(True)
    grads = one_step(sam, items)
    no_grad = {n for n, g in grads.items() if g is None or not g.abs().sum() > 0}
    plan = TrainPlan(parts=PARTS)
    expected = {n for n in grads if n.startswith(never_used(sam, plan))}
    assert no_grad == expected
    assert any(n.startswith("image_encoder.head.") for n in expected)
    assert any(n.startswith("mask_decoder.output_hypernetworks_mlps.3.") for n in expected)
    assert "prompt_encoder.not_a_point_embed.weight" in expected


@pytest.mark.parametrize("train", ["mask_decoder", "mask_decoder,prompt_encoder", "image_encoder", "all"])
def test_every_trainable_parameter_gets_a_gradient(train, items):
    sam = new_sam()
    configure(sam, TrainPlan(parts=parse_parts(train)))
    grads = one_step(sam, items)
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert trainable and {n.split(".")[0] for n in trainable} == set(parse_parts(train))
    missing = sorted(n for n in trainable if grads[n] is None or not grads[n].abs().sum() > 0)
    assert missing == []
    assert all(grads[n] is None for n, p in sam.named_parameters() if not p.requires_grad)


def test_point_prompts_keep_the_point_embeddings_and_freeze_the_box_corners():
    sam = new_sam()
    configure(sam, TrainPlan(parts=("prompt_encoder",), prompt="point"))
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.point_embeddings.0.weight", "prompt_encoder.point_embeddings.1.weight",
                         "prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight"}
    configure(sam, TrainPlan(parts=("prompt_encoder",), prompt="box+point", mask_prompt=True))
    assert all(p.requires_grad for p in sam.prompt_encoder.parameters())
    # Box prompts with corrective clicks: the clicks are points (positive, negative, -1 = none).
    configure(sam, TrainPlan(parts=("prompt_encoder",), prompt="box", mask_prompt=True))
    assert all(p.requires_grad for p in sam.prompt_encoder.parameters())


def test_multimask_is_one_switch():
    sam = new_sam()
    configure(sam, TrainPlan(multimask=True))
    assert all(p.requires_grad for p in sam.mask_decoder.parameters())
    configure(sam, TrainPlan())
    heads = sam.mask_decoder.output_hypernetworks_mlps
    assert all(p.requires_grad for p in heads[0].parameters())
    assert not any(p.requires_grad for h in heads[1:] for p in h.parameters())


@pytest.mark.parametrize("plan, moves", [
    (TrainPlan(), False),
    (TrainPlan(lora_rank=2), False),
    (TrainPlan(parts=("image_encoder",)), True),
])
def test_tiny_vit_batchnorm_statistics_move_only_when_the_encoder_trains(plan, moves, items):
    sam = new_sam()
    configure(sam, plan)
    before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items() if "running" in k}
    assert before
    one_step(sam, items)
    changed = [k for k, v in sam.image_encoder.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert bool(changed) == moves, changed


def test_parameter_counts_and_report():
    sam = new_sam()
    configure(sam, TrainPlan(lora_rank=4))
    counts = parameter_counts(sam)
    heads = sum(p.numel() for h in sam.mask_decoder.output_hypernetworks_mlps[1:] for p in h.parameters())
    decoder_total = sum(p.numel() for p in sam.mask_decoder.parameters())
    assert counts["mask_decoder"] == (decoder_total - heads, decoder_total)
    assert counts["prompt_encoder"][0] == 0
    # TinyViT attention: qkv dim -> 3 dim, proj dim -> dim; blocks per stage 2, 6, 2 at dims 128, 160, 320.
    lora = sum(n * 4 * ((d + 3 * d) + (d + d)) for n, d in ((2, 128), (6, 160), (2, 320)))
    assert counts["lora"] == (lora, lora) and counts["image_encoder"][0] == lora
    report = parameter_report(sam)
    assert f"{lora:,}" in report and "mask_decoder" in report and "of which LoRA" in report


@pytest.mark.parametrize("lora_save", ["merged", "adapters"])
def test_lora_weights_load_into_a_stock_model_and_predict_the_same(lora_save, items, tmp_path):
    base = new_sam(seed=1)
    stock_state = {k: v.clone() for k, v in base.state_dict().items()}
    plan = TrainPlan(lora_rank=2, lora_alpha=4.0)
    configure(base, plan)
    one_step(base, items, lr=0.5)  # adapters (B starts at zero) and decoder move
    saved = export_weights(base, lora_save)
    path = save_partial_weight(base, tmp_path / "best.pth", metadata={"model_type": "vit_t", **lora_metadata(plan, lora_save)},
                               weights=saved)
    if lora_save == "merged":
        assert not any("lora" in k for k in saved) and "image_encoder.layers.1.blocks.0.attn.qkv.weight" in saved
    else:
        assert any(k.endswith(".lora_A") for k in saved) and not any(k.endswith("qkv.weight") for k in saved)

    stock = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE).eval()
    stock.load_state_dict(stock_state)
    batch = prepare_batch(items, base, CPU)
    with torch.no_grad():
        before = SamTrainStep(stock)(batch.images, *batch.prompts())
        load_partial_weight(stock, path)
        theirs = SamTrainStep(stock)(batch.images, *batch.prompts())
        ours = SamTrainStep(base.eval())(batch.images, *batch.prompts())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours[0], before[0], atol=1e-3)  # the training step changed the outputs
    adapted = [k for k in saved if "layers.1.blocks.0.attn.qkv" in k]
    assert adapted and not torch.equal(stock.state_dict()["image_encoder.layers.1.blocks.0.attn.qkv.weight"],
                                       stock_state["image_encoder.layers.1.blocks.0.attn.qkv.weight"])


def test_validation_scores_with_and_without_post_processing():
    """A mask with a small island: the raw IoU counts it, the post-processed IoU (islands below
    --min_region_area removed) does not."""
    from segment_anything.utils.batch import Batch

    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=64)
    clean = torch.full((1, 1, 16, 16), -10.0)
    clean[..., 2:9, 2:9] = 10.0
    noisy = clean.clone()
    noisy[..., 13, 13] = 10.0  # one low-res pixel: a ~4 x 4 island at full size
    target = sam.postprocess_masks(clean, (64, 64), (64, 64))[:, 0] > 0
    batch = Batch(images=torch.zeros(1, 3, 64, 64), boxes=torch.zeros(1, 4), image_index=torch.zeros(1, dtype=torch.long),
                  masks=[target.float()], input_sizes=[(64, 64)], original_sizes=[(64, 64)])
    out = score(sam, batch, noisy, torch.zeros(1, 1), metrics_at_original=True, min_region_area=40)
    assert out["iou"].item() < 0.99 and out["iou_post"].item() == 1.0 and out["dice_post"].item() == 1.0
    assert "iou_post" not in score(sam, batch, noisy, torch.zeros(1, 1), metrics_at_original=True)


def test_encoder_weights_trained_at_another_size_are_interpolated_on_load(tmp_path):
    import importlib.util

    from segment_anything.build_sam import checkpoint_filter_fn

    small = sam_model_registry["vit_b"](image_size=64)  # trained at 64 px: a 4 x 4 grid
    randomize_(small.image_encoder, seed=2)
    keys = ["image_encoder.pos_embed", "image_encoder.blocks.2.attn.rel_pos_h", "image_encoder.blocks.2.attn.qkv.weight"]
    path = save_partial_weight(small, tmp_path / "best.pth", keys=keys, metadata={"model_type": "vit_b", "image_size": 64})
    big = sam_model_registry["vit_b"](image_size=128)
    load_partial_weight(big, path)
    expected = checkpoint_filter_fn({k: small.state_dict()[k] for k in keys}, big)
    for key in keys:
        torch.testing.assert_close(big.state_dict()[key], expected[key])
    assert big.state_dict()["image_encoder.pos_embed"].shape == (1, 8, 8, 768)

    # Beside Meta's package (save_weight.py loaded from its file, as load_model_ex.py does) the
    # interpolation is not available: a clear error instead of a shape mismatch.
    spec = importlib.util.spec_from_file_location("save_weight_alone", REPO / "segment_anything/utils/save_weight.py")
    alone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone)
    with pytest.raises(ValueError, match="trained at image_size 64"):
        alone.load_partial_weight(sam_model_registry["vit_b"](image_size=128), path)


def test_low_res_loss_scores_the_low_res_grid_and_validation_metrics_stay_at_the_original_size():
    from segment_anything.utils.losses import LossSpec, low_res_pair, parse_loss
    from segment_anything.utils.metrics import mask_iou
    from segment_anything.utils.batch import Batch

    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=64)
    torch.manual_seed(0)
    low = torch.randn(1, 1, 16, 16) * 5
    target = torch.zeros(1, 40, 80)
    target[:, 5:30, 10:50] = 1  # a 40 x 80 image, resized to 32 x 64 inside the 64 x 64 input
    batch = Batch(images=torch.zeros(1, 3, 64, 64), boxes=torch.zeros(1, 4), image_index=torch.zeros(1, dtype=torch.long),
                  masks=[target], input_sizes=[(32, 64)], original_sizes=[(40, 80)])
    spec = LossSpec(parse_loss("bce=1"), size="low_res")
    logits, small = low_res_pair(low[:, 0], target, (32, 64), 64)
    assert logits.shape == (1, 8, 16)
    train = score(sam, batch, low, torch.zeros(1, 1), spec)
    torch.testing.assert_close(train["loss"], torch.nn.functional.binary_cross_entropy_with_logits(logits, small).reshape(1))
    torch.testing.assert_close(train["iou"], mask_iou(logits > 0, small))
    val = score(sam, batch, low, torch.zeros(1, 1), spec, metrics_at_original=True)
    full = sam.postprocess_masks(low, (32, 64), (40, 80))[:, 0] > 0
    torch.testing.assert_close(val["iou"], mask_iou(full, target))
    torch.testing.assert_close(val["loss"], train["loss"])
