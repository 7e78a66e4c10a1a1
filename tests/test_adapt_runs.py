"""End-to-end runs of run.py for adapting what trains: accumulation under DDP, encoder training of vit_t under
2 processes, and LoRA / prompt-encoder runs whose best.pth Meta's own package loads.

Helpers and the synthetic-data fixtures come from tests/test_run.py.
"""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, require_shared_data
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure
from test_run import SIZE, assert_synchronised, base_flags, data, free_port, last_weights, run_ok, straight_run  # noqa: F401
from test_stock_sam import meta_sam_dir, run_example


def test_two_processes_accumulating_two_steps_train_like_one_process_with_the_whole_batch(data, straight_run, tmp_path):
    """2 ranks x batch 1 x --accumulate 2 make one optimizer step per epoch on the same 4 images
    as 1 x batch 4 (DDP's no_sync on the first micro-step, the loss divided by the group's count)."""
    out = tmp_path / "p2_b1_acc2"
    run_ok(base_flags(*data, out, batch_size=1, accumulate=2, epoch=2, world_size=2, port=free_port()))
    assert_synchronised(last_weights(straight_run), last_weights(out))


def test_vit_t_encoder_training_under_two_processes(data, tmp_path):
    """--train image_encoder on TinyViT: DDP runs (no unused parameter: the classifier head is
    frozen), the log counts parameters per part, and best.pth holds the encoder with its moved
    BatchNorm statistics (rank 0's, which DDP broadcasts to every rank at each forward)."""
    out = tmp_path / "enc"
    run_ok(base_flags(*data, out, batch_size=2, epoch=1, world_size=2, port=free_port(), grad_checkpoint="true")
           + ["--train", "image_encoder", "--min_region_area", "20", "--loss", "focal=20,dice=1,iou_head=1"])
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"]
    torch.manual_seed(21)
    init = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE).state_dict()
    assert all(k.startswith("image_encoder.") and ".head." not in k and "norm_head" not in k for k in best)
    stats = [k for k in best if k.endswith("running_mean")]
    assert stats and all(not torch.equal(best[k], init[k]) for k in stats)
    log = (out / "train.log").read_text()
    assert "image_encoder            trainable" in log and "2 process(es) on cpu" in log
    assert "post-processed IoU" in log and "(focal " in log
    line = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert 0 <= line["val_iou_post"] <= 1 and 0 <= line["val_dice_post"] <= 1 and "train_loss_focal" in line


def nails_subset(root, n_train=2, n_val=2):
    """A few nails photos (the smallest, to keep the runs short) in the images/ + labels/ layout."""
    nails = require_shared_data("nails")
    files = sorted((nails / "images").iterdir(), key=lambda p: p.stat().st_size)[: n_train + n_val]
    for split, chosen in (("train", files[:n_train]), ("val", files[n_train:])):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True)
        for f in chosen:
            shutil.copy(f, root / split / "images" / f.name)
            shutil.copy(nails / "labels" / f.name, root / split / "labels" / f.name)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """An official-format vit_b checkpoint with random weights (Meta's builder is fixed at 1024)."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(randomize_(sam_model_registry["vit_b"](), seed=0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def untuned_predictor(vit_b_checkpoint):
    """The model before fine-tuning with a photo's embedding, made once per photo: both cases below
    prompt the same photo, and the prompt case's encoder (frozen) is this model's encoder."""
    memo = {}

    def get(image_name: str, rgb: np.ndarray) -> SamPredictor:
        if image_name not in memo:
            memo[image_name] = SamPredictor(sam_model_registry["vit_b"](checkpoint=vit_b_checkpoint).eval())
            memo[image_name].set_image(rgb)
        return memo[image_name]

    return get


@pytest.mark.parametrize("flags", [{"lora_rank": 4}, {"train": "mask_decoder,prompt_encoder"}], ids=["lora", "prompt"])
def test_best_pth_loads_into_meta_sam_and_predicts_like_our_adapter_model(flags, vit_b_checkpoint, untuned_predictor, tmp_path):
    """Train vit_b for one epoch on 2 processes (at 256 px, to be fast: neither LoRA's merged
    qkv/proj weights nor the decoder depend on the input size), then segment a nails photo at
    1024 px with Meta's Sam + best.pth (through load_model_ex.py) and with our model holding the
    unmerged adapters from last.pth: the masks agree on >= 99.9 % of the pixels."""
    meta_dir = meta_sam_dir()
    train, val = nails_subset(tmp_path / "data")
    out = tmp_path / "run"
    run_ok(["--model_type", "vit_b", "--checkpoint", str(vit_b_checkpoint), "--image_size", "256", "--epoch", "1",
            "--batch_size", "1", "--world_size", "2", "--port", str(free_port()), "--num_workers", "0", "--lr", "1e-3",
            "--train_dir", str(train), "--val_dir", str(val), "--output_dir", str(out), "--mask_threshold", "127",
            *[x for k, v in flags.items() for x in (f"--{k}", str(v))]])
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert not any("lora" in k for k in best["model"])
    if "lora_rank" in flags:
        assert "image_encoder.blocks.0.attn.qkv.weight" in best["model"] and best["lora"]["rank"] == 4
    else:
        assert {k for k in best["model"] if k.startswith("prompt_encoder.")} == {
            "prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embeddings.3.weight",
            "prompt_encoder.no_mask_embed.weight"}

    # Ours: the adapter model (LoRA layers unmerged) with last.pth's tensors, at 1024 px.
    image = sorted((train / "images").iterdir())[0]
    sam = sam_model_registry["vit_b"](checkpoint=vit_b_checkpoint)
    configure(sam, TrainPlan(parts=tuple(flags.get("train", "mask_decoder").split(",")), lora_rank=flags.get("lora_rank", 0)))
    state = sam.state_dict()
    for k, v in last_weights(out).items():
        state[k].copy_(v)
    if "lora_rank" in flags:
        assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in last_weights(out).items())
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    box = np.array([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])  # load_model_ex.py's default box

    def logits(predictor):
        return predictor.predict(box=box, multimask_output=False, return_logits=True)[0][0]

    untuned = untuned_predictor(image.name, rgb)
    base = logits(untuned)  # before fine-tuning
    predictor = SamPredictor(sam.eval())
    if "lora_rank" in flags:  # the adapters change the encoder: an embedding of its own
        predictor.set_image(rgb)
    else:  # the embedding depends on the encoder and the pixel normalisation alone, which did not train
        mine, theirs = ({k: v for k, v in m.state_dict().items() if k.startswith(("image_encoder.", "pixel_"))}
                        for m in (sam, untuned.model))
        assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
        predictor.features, predictor.original_size, predictor.input_size = untuned.features, untuned.original_size, untuned.input_size
        predictor.is_image_set = True
    ours = logits(predictor)

    # load_model_ex.py runs best.pth at the size it records (256) and Meta's Sam has only 1024; neither
    # LoRA's merged weights nor the decoder depend on the size, so a copy relabelled 1024 is the same model.
    best_1024 = tmp_path / "best_1024.pth"
    torch.save({**best, "image_size": 1024}, best_1024)
    mask_file, logits_file = tmp_path / "meta.png", tmp_path / "meta.npy"
    stdout = run_example("installed", ["--checkpoint", str(vit_b_checkpoint), "--weights", str(best_1024),
                                       "--image", str(image), "--output", str(mask_file), "--logits", str(logits_file)],
                         cwd=tmp_path)
    assert str(meta_dir) in stdout.splitlines()[0], stdout
    meta = np.load(logits_file)
    assert meta.shape == ours.shape
    # A random model's mask is often empty (as here): the logits are what must agree. Meta's
    # SAM with best.pth gives our adapter model's logits, and clearly not the untuned model's.
    scale = np.abs(ours).max()
    tuned_gap, base_gap = np.abs(meta - ours).max(), np.abs(meta - base).max()
    print(f"{flags}: logits up to {scale:.3g}; Meta vs ours {tuned_gap:.2g}, Meta vs untuned {base_gap:.2g}")
    assert tuned_gap <= 1e-3 * scale and base_gap > 100 * tuned_gap
    assert ((cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED) > 0) == (meta > 0)).all()  # the PNG is the thresholded logits
