"""Tests for segment_anything.utils.trainer and training.config, in one process (plus one 2-rank gloo check).

The model is vit_t with random weights at a 128-pixel encoder input (8 x 8 embedding grid, 32 x 32
low-resolution masks); 64 pixels runs too but is no faster, as building the model dominates.
"""

import dataclasses
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO, relative_error, run_ranks
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.training.config import FALSE_WORDS, TRUE_WORDS, TrainConfig
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import MaskDataset, load_image, load_records
from segment_anything.utils.metrics import mask_iou
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainer import (
    PromptLoop, SamTrainStep, prepare_batch, score, step_loss, train_one_epoch,
)
from segment_anything.utils.trainable import TrainPlan, configure, set_train_mode
from segment_anything.utils.transforms import ResizeLongestSide

SIZE = 128
CPU = torch.device("cpu")
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# With multimask_output=False only mask token 0 reaches the loss: the hypernetwork MLPs of the
# three multimask tokens would get exactly zero gradient, so configure() leaves them frozen.
MULTIMASK_HEADS = tuple(f"mask_decoder.output_hypernetworks_mlps.{i}." for i in (1, 2, 3))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three images of different sizes and aspect ratios (some scaled up, some down to 128)."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=3, size_range=(70, 220), seed=5)
    ds = MaskDataset(load_records(root), SIZE)
    sizes = [ds[i]["original_size"] for i in range(len(ds))]
    assert len(set(sizes)) == 3 and any(max(s) > SIZE for s in sizes) and any(max(s) < SIZE for s in sizes), sizes
    return ds


def new_sam(seed: int = 0):
    """Random vit_t: seeded default initialisation (its decoder gives masks that are neither empty
    nor full) with a randomized encoder (BatchNorm statistics away from 0 and 1)."""
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    randomize_(sam.image_encoder, seed=seed)
    configure(sam, TrainPlan())
    return sam


def items_with_two_prompts(ds):
    """Dataset items; the second image gets a second prompt (the whole-image box, same mask)."""
    items = [ds[i] for i in range(len(ds))]
    h, w = items[1]["original_size"]
    items[1] = dict(items[1], masks=items[1]["masks"].repeat(2, 1, 1),
                    boxes=torch.cat([items[1]["boxes"], torch.tensor([[0.0, 0.0, w, h]])]))
    return items


def one_shot_training(sam, loader):
    """train_one_epoch over loader (a list of batches) with AdamW at a constant LR, no AMP."""
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(SamTrainStep(sam), sam, loader, opt, sched, scaler, CPU, None)


# ----------------------------------------------------------------------------- freezing and modes


def test_freeze_leaves_only_the_mask_decoder_trainable():
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    assert configure(sam, TrainPlan()) == []  # no LoRA layers
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    decoder = {n for n, _ in sam.named_parameters() if n.startswith("mask_decoder.")}
    heads = {n for n in decoder if n.startswith(MULTIMASK_HEADS)}
    assert len(heads) == 18 and trainable == decoder - heads
    configure(sam, TrainPlan())  # idempotent
    assert {n for n, p in sam.named_parameters() if p.requires_grad} == trainable


def test_one_training_step_gives_every_decoder_parameter_a_gradient(dataset):
    sam = new_sam()
    one_shot_training(sam, [[dataset[0], dataset[1]]])
    zero, missing = [], []
    for name, p in sam.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
            continue
        assert name.startswith("mask_decoder.") and not name.startswith(MULTIMASK_HEADS), name
        if p.grad is None:
            missing.append(name)
        elif not p.grad.abs().sum() > 0:
            zero.append(name)
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert missing == [], "trainable parameters outside the graph would stall DDP"
    assert zero == [], f"trainable parameters with an all-zero gradient: {zero}"


def test_frozen_tiny_vit_stays_in_eval_mode_and_keeps_its_batchnorm_statistics(dataset):
    sam = new_sam()
    seen = []
    sam.image_encoder.register_forward_pre_hook(lambda m, a: seen.append((m.training, sam.mask_decoder.training)))
    before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    metrics = one_shot_training(sam, [[dataset[0], dataset[1]], [dataset[2]]])
    assert seen == [(False, True), (False, True)]
    for key, value in sam.image_encoder.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during training"
    assert metrics["images"] == 3 and metrics["prompts"] == 3
    # Sanity check that the test could fail: the same images in train mode do move the statistics.
    sam.image_encoder.train()
    with torch.no_grad():
        sam.image_encoder(prepare_batch([dataset[0]], sam, CPU).images)
    assert any(not torch.equal(v, before[k]) for k, v in sam.image_encoder.state_dict().items() if "running" in k)


def test_set_train_mode_follows_requires_grad():
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    configure(sam, TrainPlan(parts=("prompt_encoder", "mask_decoder")))
    sam.eval()
    set_train_mode(sam)
    assert (sam.image_encoder.training, sam.prompt_encoder.training, sam.mask_decoder.training) == (False, True, True)
    assert not any(m.training for m in sam.image_encoder.modules())


def sgd_epoch(sam, loader, accumulate=1):
    """train_one_epoch with plain SGD (lr 1): the update is the gradient itself, so a wrongly
    scaled loss shows (Adam's first step would hide it)."""
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(SamTrainStep(sam), sam, loader, opt, sched, scaler, CPU, None, accumulate=accumulate)


def test_accumulating_two_micro_batches_equals_one_big_batch(dataset):
    items = items_with_two_prompts(dataset)  # prompts per image: 1, 2, 1
    big, acc = new_sam(), new_sam()
    start = {k: v.clone() for k, v in big.state_dict().items()}
    m_big = sgd_epoch(big, [items])
    m_acc = sgd_epoch(acc, [items[:1], items[1:]], accumulate=2)  # micro-batches of 1 and 3 prompts
    moved = 0
    for key, value in big.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(value, start[key])
    assert moved > 10
    assert m_acc == pytest.approx(m_big, rel=1e-5)


def test_the_micro_batches_of_a_step_share_its_number_counted_from_the_first_step(dataset):
    """The step number seeds per-step draws (interactive click rounds): every micro-batch of an
    optimizer step gets the same, so any split of a global batch into processes and accumulated
    micro-batches draws alike, and a resumed epoch goes on counting where it stopped."""
    seen = []

    class Recording(PromptLoop):
        def train_step(self, model, sam, batch, items, cache, amp_dtype, epoch, step):
            seen.append(step)
            return super().train_step(model, sam, batch, items, cache, amp_dtype, epoch, step)

    sam = new_sam()
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_one_epoch(SamTrainStep(sam), sam, [[dataset[i]] for i in range(3)], opt, sched,
                    torch.amp.GradScaler("cpu", enabled=False), CPU, None, accumulate=2, task=Recording(), first_step=5)
    assert seen == [5, 5, 6]


# ----------------------------------------------------------------------------- batching


def test_prepare_batch_maps_boxes_and_pads_like_the_predictor(dataset):
    sam = new_sam()
    items = items_with_two_prompts(dataset)
    batch = prepare_batch(items, sam, CPU)
    transform = ResizeLongestSide(SIZE)
    expected_boxes = np.concatenate([transform.apply_boxes(it["boxes"].numpy(), it["original_size"]) for it in items])
    assert batch.boxes.shape == (4, 4) and batch.boxes.dtype == torch.float32
    np.testing.assert_allclose(batch.boxes.numpy(), expected_boxes, rtol=1e-6, atol=1e-4)
    assert batch.image_index.tolist() == [0, 1, 1, 2]
    assert batch.images.shape == (3, 3, SIZE, SIZE)
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    for i, it in enumerate(items):
        h, w = it["input_size"]
        assert max(h, w) == SIZE and tuple(it["image"].shape[1:]) == (h, w)
        expected = torch.zeros(3, SIZE, SIZE)
        expected[:, :h, :w] = (it["image"].float() - mean) / std  # normalise, then pad bottom/right with 0
        torch.testing.assert_close(batch.images[i], expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(batch.masks[i], it["masks"])
    assert batch.input_sizes == [tuple(it["input_size"]) for it in items]
    assert batch.original_sizes == [tuple(it["original_size"]) for it in items]
    assert batch.num_images == 3


def test_training_step_computes_what_sam_predictor_computes(dataset):
    """Batched images of three sizes, one of them with two prompts, through SamTrainStep and the
    post-processing of score(): per image, the same logits as SamPredictor on that image alone."""
    sam = new_sam(seed=3)
    set_train_mode(sam)  # the mode the training loop uses
    items = items_with_two_prompts(dataset)
    batch = prepare_batch(items, sam, CPU)
    with torch.no_grad():
        low_res, iou_pred = SamTrainStep(sam)(batch.images, batch.boxes, batch.image_index)
        terms = score(sam, batch, low_res, iou_pred)
    assert low_res.shape == (4, 1, SIZE // 4, SIZE // 4) and iou_pred.shape == (4, 1)

    sam.eval()
    predictor = SamPredictor(sam)
    start, nontrivial = 0, 0
    for i, it in enumerate(items):
        image = load_image(it["path"])  # what the dataset reads: RGB uint8
        predictor.set_image(image)
        for j, box in enumerate(it["boxes"].numpy()):
            k = start + j
            ours = sam.postprocess_masks(low_res[k : k + 1], batch.input_sizes[i], batch.original_sizes[i])[0]
            masks, ious, low = predictor.predict(box=box, multimask_output=False, return_logits=True)
            assert masks.shape == (1, *image.shape[:2]) == tuple(ours.shape)
            assert relative_error(ours, torch.from_numpy(masks)) <= 1e-4, (i, j)
            assert relative_error(low_res[k], torch.from_numpy(low)) <= 1e-4, (i, j)
            assert relative_error(iou_pred[k], torch.from_numpy(ious)) <= 1e-4, (i, j)
            # score() measures the predictor's binary mask against the ground truth
            real = mask_iou(torch.from_numpy(masks) > sam.mask_threshold, it["masks"][j : j + 1]).item()
            assert terms["iou"][k].item() == pytest.approx(real, abs=1e-3)
            nontrivial += 0.0 < (masks > 0).mean() < 1.0
        start += len(it["boxes"])
    assert nontrivial >= 2  # random weights still give masks worth comparing


# ----------------------------------------------------------------------------- reductions


RANK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from segment_anything.utils.distributed import all_gather_objects, destroy_distributed, init_distributed
    from segment_anything.utils.metrics import Meter
    from segment_anything.utils.trainer import step_loss

    rank, port = int(sys.argv[1]), int(sys.argv[2])
    info = init_distributed("cpu", rank, rank, 2, f"tcp://127.0.0.1:{port}")
    # Unequal prompt counts per rank: 3 on rank 0, 1 on rank 1.
    x_all = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 1.0], [-2.0, 4.0]])
    x = x_all[:3] if rank == 0 else x_all[3:]
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    ddp = DDP(model)
    totals = ddp(x)[:, 0] ** 2
    loss = step_loss({"loss": totals}, info.device)
    loss.backward()
    meter = Meter(["loss", "iou", "dice"])
    if rank == 0:
        meter.add({"loss": torch.tensor([1.0, 2.0, 3.0]), "iou": torch.tensor([0.0, 0.5, 1.0]),
                   "dice": torch.tensor([0.0, 1.0, 1.0])}, images=2)
    else:
        meter.add({"loss": torch.tensor([10.0]), "iou": torch.tensor([1.0]),
                   "dice": torch.tensor([0.5])}, images=1)
    out = {"loss": loss.item(), "grad": model.weight.grad.tolist(), "weight": model.weight.tolist(),
           "meter": meter.reduce(info.device), "gathered": all_gather_objects(rank * 10)}
    # DDP's reducer, kept alive by the wrapper (in reference cycles) and by the outputs' graph, must
    # go while the group exists: destroyed at interpreter exit it aborts the process ("terminate
    # called without an active exception") in about 1 run in 5 on torch 2.14. fit() frees them
    # when train_one_epoch returns.
    del ddp, totals, loss
    gc.collect()
    destroy_distributed()
    print("RESULT " + json.dumps(out))
    """
)


def test_step_loss_and_meter_across_two_gloo_ranks_with_unequal_prompt_counts(tmp_path):
    results = run_ranks(RANK_SCRIPT, tmp_path)
    r0, r1 = results
    # Each rank: its own sum * world size / global prompt count.
    weight = torch.tensor(r0["weight"])
    x_all = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 1.0], [-2.0, 4.0]])
    per_prompt = (x_all @ weight.T)[:, 0] ** 2
    assert r0["loss"] == pytest.approx(per_prompt[:3].sum().item() * 2 / 4, rel=1e-6)
    assert r1["loss"] == pytest.approx(per_prompt[3:].sum().item() * 2 / 4, rel=1e-6)
    # After DDP's averaging, every rank holds the gradient of the mean over all 4 prompts.
    w = weight.clone().requires_grad_(True)
    ((x_all @ w.T)[:, 0] ** 2).mean().backward()
    for r in (r0, r1):
        torch.testing.assert_close(torch.tensor(r["grad"]), w.grad, rtol=1e-6, atol=1e-7)
    # ...which a plain per-rank mean (then DDP's average: a mean of rank means) would not give.
    rank_means = [torch.autograd.grad(((x @ w.T)[:, 0] ** 2).mean(), w)[0] for x in (x_all[:3], x_all[3:])]
    assert (sum(rank_means) / 2 - w.grad).abs().max() > 0.1
    expected = {"loss": 4.0, "iou": 0.625, "dice": 0.625, "prompts": 4, "images": 3}
    assert r0["meter"] == pytest.approx(expected) and r1["meter"] == pytest.approx(expected)
    assert r0["gathered"] == r1["gathered"] == [0, 10]


# ----------------------------------------------------------------------------- configuration


def test_config_defaults():
    cfg = TrainConfig.from_args([])
    assert (cfg.batch_size, cfg.port, cfg.dist, cfg.seed, cfg.model_type, cfg.epoch, cfg.lr, cfg.image_size) == (
        1, None, True, 21, "vit_t", 10, 2e-4, 1024)  # port None: a free one
    assert cfg == TrainConfig()
    assert cfg.world_size is None and cfg.val_dir is None and cfg.resume is None and cfg.checkpoint is None


@pytest.mark.parametrize("word", ["yes", "YES", "true", "True", "t", "T", "y", "Y", "1", " true "])
def test_dist_flag_accepts_true_words(word):
    assert TrainConfig.from_args(["--dist", word]).dist is True


@pytest.mark.parametrize("word", ["no", "No", "false", "FALSE", "f", "F", "n", "N", "0"])
def test_dist_flag_accepts_false_words(word):
    assert TrainConfig.from_args(["--dist", word]).dist is False


def test_bool_words_are_the_documented_ones():
    assert TRUE_WORDS == ("yes", "true", "t", "y", "1") and FALSE_WORDS == ("no", "false", "f", "n", "0")


@pytest.mark.parametrize("argv, skip_bad, dist", [
    (["--skip_bad"], True, True),
    (["--skip_bad", "True"], True, True),
    (["--skip_bad", "no"], False, True),
    (["--dist"], False, True),
    (["--dist", "False", "--skip_bad"], True, False),
    (["--skip_bad", "--dist", "0", "--batch_size", "2"], True, False),
])
def test_bool_flags_stand_alone_or_take_a_value(argv, skip_bad, dist):
    """A bare boolean flag means true; a value after it is still read (the README's --dist True)."""
    cfg = TrainConfig.from_args(argv)
    assert (cfg.skip_bad, cfg.dist) == (skip_bad, dist)


def test_every_bool_flag_stands_alone():
    flags = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (bool, "bool")]
    assert {"dist", "skip_bad", "no_cache", "compile"} <= set(flags)
    parser = TrainConfig.parser()
    for name in flags:
        assert getattr(parser.parse_args([f"--{name}"]), name) is True, name


@pytest.mark.parametrize("word", ["maybe", "2", "", "on", "off", "yess"])
def test_dist_flag_rejects_other_words(word, capsys):
    with pytest.raises(SystemExit) as exc:
        TrainConfig.from_args(["--dist", word])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--dist" in err and repr(word) in err


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--image_size", "100"], "--image_size must be a positive multiple of 16, got 100"),
    (["--image_size", "0"], "--image_size must be a positive multiple of 16"),
    (["--epoch", "0"], "--epoch must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--val_fraction", "1"], "--val_fraction must be in (0, 1)"),
    (["--mask_threshold", "255"], "--mask_threshold must be in [0, 254]"),
    (["--world_size", "0"], "--world_size must be >= 1"),
    (["--port", "70000"], "--port must be a TCP port"),
    (["--patience", "-1"], "--patience must be >= 0"),
    (["--cache_max_gb", "-1"], "--cache_max_gb must be >= 0 (0: no bound), got -1"),
    (["--model_type", "vit_x"], "invalid choice: 'vit_x'"),
    (["--batch_size", "two"], "invalid int value: 'two'"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
])
def test_invalid_values_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        TrainConfig.from_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_all_errors_are_reported_at_once():
    with pytest.raises(ValueError) as exc:
        TrainConfig(batch_size=0, epoch=0, lr=-1.0)
    text = str(exc.value)
    assert "--batch_size" in text and "--epoch" in text and "--lr" in text


def test_config_round_trips_through_json():
    cfg = TrainConfig.from_args(["--world_size", "2", "--val_dir", "v", "--lr", "1e-3", "--dist", "no",
                                 "--checkpoint", "none", "--num_workers", "0"])
    assert cfg.world_size == 2 and cfg.lr == 1e-3 and cfg.num_workers == 0 and cfg.random_init
    assert cfg.checkpoint_path() is None
    assert TrainConfig(**json.loads(cfg.to_json())) == cfg
