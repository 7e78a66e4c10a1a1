"""The training step with point prompts (and boxes with points), and validation in chunks.

Same set-up as test_trainer.py: vit_t with random weights at a 128-pixel encoder input.
"""

import numpy as np
import pytest
import torch

from conftest import relative_error
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.utils.data import MaskDataset, load_image, load_records, make_synthetic_dataset
from segment_anything.utils.data.prompts import PromptConfig, object_prompts
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import TrainPlan, configure, set_train_mode
from segment_anything.utils.batch import prepare_batch
from segment_anything.utils.trainer import SamTrainStep, evaluate
from segment_anything.utils.transforms import ResizeLongestSide

SIZE = 128
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Three images of different sizes; each gets point prompts with a different point count
    (K = 1, 3, 2), so the batch pads to K = 3 with label -1."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "train", n=3, size_range=(70, 220), seed=5)
    ds = MaskDataset(load_records(root), SIZE)
    configs = [PromptConfig("point", num_points=1), PromptConfig("point", num_points=2, negative_points=1),
               PromptConfig("point", num_points=1, point_mode="random", negative_points=1)]
    out = []
    for i, cfg in enumerate(configs):
        it = ds[i]
        _, pts, labels = object_prompts(it["masks"][0].numpy(), cfg, np.random.default_rng(i))
        out.append(dict(it, points=torch.from_numpy(pts)[None], point_labels=torch.from_numpy(labels)[None]))
    assert [it["points"].shape[1] for it in out] == [1, 3, 2]
    assert out[1]["point_labels"].tolist() == [[1, 1, 0]]
    return out


def new_sam(seed: int = 0):
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE)
    randomize_(sam.image_encoder, seed=seed)
    configure(sam, TrainPlan(prompt="box+point"))
    return sam


def test_prepare_batch_maps_points_and_pads_with_minus_one(items):
    sam = new_sam()
    batch = prepare_batch([dict(it, prompt="box+point") for it in items], sam, CPU)
    transform = ResizeLongestSide(SIZE)
    assert batch.points.shape == (3, 3, 2) and batch.point_labels.shape == (3, 3) and batch.boxes.shape == (3, 4)
    for i, it in enumerate(items):
        k = it["points"].shape[1]
        expected = transform.apply_coords(it["points"][0].numpy(), it["original_size"])
        np.testing.assert_allclose(batch.points[i, :k].numpy(), expected, rtol=1e-6, atol=1e-4)
        assert batch.point_labels[i, :k].tolist() == it["point_labels"][0].tolist()
        assert batch.point_labels[i, k:].tolist() == [-1.0] * (3 - k)
    only_points = prepare_batch([dict(it, prompt="point") for it in items], sam, CPU)
    assert only_points.boxes is None and torch.equal(only_points.points, batch.points)
    only_boxes = prepare_batch(items, sam, CPU)  # no "prompt" key: boxes, as before
    assert only_boxes.points is None and torch.equal(only_boxes.boxes, batch.boxes)
    with pytest.raises(ValueError, match="mixes"):
        prepare_batch([dict(items[0], prompt="point"), items[1]], sam, CPU)


@pytest.mark.parametrize("prompt", ["point", "box+point"])
def test_training_step_with_points_computes_what_sam_predictor_computes(items, prompt):
    """One decoder call for the batch gives, per object, SamPredictor.predict's logits for the
    same image with the same (padded) points and labels, and the box when there is one."""
    sam = new_sam(seed=3)
    set_train_mode(sam)
    batch = prepare_batch([dict(it, prompt=prompt) for it in items], sam, CPU)
    calls = []
    sam.mask_decoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        low_res, iou_pred = SamTrainStep(sam)(batch.images, *batch.prompts())
    assert calls == [1] and low_res.shape == (3, 1, SIZE // 4, SIZE // 4)

    sam.eval()
    predictor = SamPredictor(sam)
    nontrivial = 0
    for i, it in enumerate(items):
        predictor.set_image(load_image(it["path"]))
        k = it["points"].shape[1]
        coords = np.zeros((3, 2), np.float32)
        labels = np.full(3, -1, np.int64)
        coords[:k], labels[:k] = it["points"][0].numpy(), it["point_labels"][0].numpy()
        box = it["boxes"][0].numpy() if prompt == "box+point" else None
        masks, ious, low = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                             multimask_output=False, return_logits=True)
        ours = sam.postprocess_masks(low_res[i : i + 1], batch.input_sizes[i], batch.original_sizes[i])[0]
        assert relative_error(ours, torch.from_numpy(masks)) <= 1e-4, i
        assert relative_error(low_res[i], torch.from_numpy(low)) <= 1e-4, i
        assert relative_error(iou_pred[i], torch.from_numpy(ious)) <= 1e-4, i
        nontrivial += 0.0 < (masks > 0).mean() < 1.0
    assert nontrivial >= 2
    # The points really reach the decoder: without them the logits change.
    if prompt == "box+point":
        with torch.no_grad():
            boxes_only, _ = SamTrainStep(sam)(batch.images, batch.boxes, batch.image_index)
        assert (boxes_only - low_res).abs().max() > 1e-3


def test_evaluate_encodes_an_image_split_into_chunks_once_and_scores_like_one_item(items):
    """Validation of an image in chunks (items sharing `index`) equals validating it whole,
    with one encoder pass per image whatever the batch boundaries."""
    sam = new_sam(seed=4)
    item = items[1]
    three = dict(item, masks=item["masks"].repeat(3, 1, 1), boxes=item["boxes"].repeat(3, 1) + torch.tensor([[0.0], [2.0], [1.0]]),
                 points=item["points"].repeat(3, 1, 1), point_labels=item["point_labels"].repeat(3, 1), prompt="box+point")
    whole = dict(three, index=1, first_chunk=True)
    chunks = [dict(whole, **{k: whole[k][s] for k in ("masks", "boxes", "points", "point_labels")},
                   first_chunk=s.start == 0) for s in (slice(0, 2), slice(2, 3))]
    other = dict(items[0], index=0, first_chunk=True, prompt="box+point")
    encoded = []
    sam.image_encoder.register_forward_hook(lambda m, a, out: encoded.append(a[0].shape[0]))
    ref = evaluate(sam, [[other, whole]], CPU, None)
    assert encoded == [2]
    encoded.clear()
    split = evaluate(sam, [[other, chunks[0]], [chunks[1]]], CPU, None)
    assert encoded == [2]  # the second batch reuses the embedding of the first
    assert split["images"] == ref["images"] == 2 and split["prompts"] == ref["prompts"] == 4
    for key in ("loss", "iou", "dice"):
        assert split[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6)
