""""IoU after k clicks" two ways: the batched validation (click_eval.click_metrics, every object of
every image decoded together per round) against the per-object session the evaluate tool runs
(clicks.click_session through SamPredictor), on the same random model and images."""

import numpy as np
import pytest
import torch

from segment_anything import SamPredictor, sam_model_registry
from segment_anything.utils.click_eval import click_metrics
from segment_anything.utils.clicks import click_session
from segment_anything.utils.data import MaskDataset, load_records, make_synthetic_dataset
from segment_anything.utils.data.prompts import center_points, mask_to_box
from segment_anything.utils.metrics import mask_iou
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.batch import prepare_batch

SIZE, CLICKS = 128, (1, 2, 3)
pytestmark = pytest.mark.usefixtures("one_thread")


def per_object(predictor: SamPredictor, target: np.ndarray, start: str):
    """IoU after each of CLICKS corrective clicks for one object, decoded alone."""
    box = mask_to_box(target) if start == "box" else None
    points = center_points(target, 1) if start == "point" else np.zeros((0, 2), np.float32)
    labels = np.ones(len(points), np.float32)

    def predict(points, labels, logits):
        masks, _, low = predictor.predict(points if len(points) else None, labels if len(labels) else None, box, logits,
                                          multimask_output=False)
        return masks[0], low

    if start == "point":  # the best of the three masks, as click_metrics starts
        masks, scores, low = predictor.predict(points, labels, multimask_output=True)
        first, logits = masks[scores.argmax()], low[scores.argmax()][None]
    else:
        first, logits = predict(points, labels, None)
    session = click_session(predict, target, points, labels, first, logits, max(CLICKS))
    return [mask_iou(torch.from_numpy(session[k - 1][None]), torch.from_numpy(target[None])).item() for k in CLICKS]


def test_batched_and_per_object_iou_after_k_clicks_agree(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n=2, size_range=(70, 150), seed=5, objects=2)
    dataset = MaskDataset(load_records(root), SIZE)
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=SIZE).eval()
    randomize_(sam.image_encoder, seed=0)  # the decoder keeps its own initialisation: masks of every size
    batch = prepare_batch([dataset[0], dataset[1]], sam, torch.device("cpu"))
    with torch.no_grad():
        embeddings = sam.image_encoder(batch.images)
        batched = click_metrics(sam, batch, embeddings, CLICKS)
    predictor = SamPredictor(sam)
    for start in ("point", "box"):
        alone = []
        for i, targets in enumerate(batch.masks):
            predictor.features = embeddings[batch.encode_rows[i]][None]  # the image as the batch embedded it
            predictor.input_size, predictor.original_size = batch.input_sizes[i], batch.original_sizes[i]
            predictor.is_image_set = True
            alone += [per_object(predictor, t.numpy().astype(bool), start) for t in targets]
        got = torch.stack([batched[f"{start}_click{k}_iou"] for k in CLICKS], 1)
        assert got.shape == (len(alone), len(CLICKS)) and len(alone) >= 4
        assert got.std() > 1e-3, "every IoU alike: the comparison would be trivial"
        torch.testing.assert_close(got, torch.tensor(alone), atol=1e-4, rtol=0)
