"""The exported ONNX decoder, run in onnxruntime, against our model in PyTorch."""

import numpy as np
import pytest
import torch

from conftest import require_shared_data
from segment_anything import SamPredictor
from segment_anything.tools import export_onnx
from segment_anything.tools._model import build_base
from segment_anything.utils.data import load_image
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import load_partial_weight, save_partial_weight

ort = pytest.importorskip("onnxruntime")
SIZE = 256


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A fine-tuned best.pth (random decoder) on the seeded random base, exported by the CLI for
    all masks and for one mask; our predictor with the same weights, on a nails photo."""
    tmp = tmp_path_factory.mktemp("onnx")
    tuned = randomize_(build_base("vit_t", "none", SIZE), seed=4)
    weights = save_partial_weight(tuned, tmp / "best.pth", {"model_type": "vit_t", "image_size": SIZE}, keys=["mask_decoder"])
    paths = {}
    for single in (False, True):
        paths[single] = tmp / f"decoder_{single}.onnx"
        export_onnx.main(["--model_type", "vit_t", "--checkpoint", "none", "--weights", str(weights),
                          "--output", str(paths[single])] + (["--return_single_mask"] if single else []))
    sam = build_base("vit_t", "none", SIZE)
    load_partial_weight(sam, weights)
    predictor = SamPredictor(sam.eval())
    image = load_image(require_shared_data("nails") / "images" / "d60153c0-db67-11e8-9658-0242ac1c0002.jpg")
    predictor.set_image(image)
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    return predictor, sessions


def run_onnx(session, predictor, coords, labels):
    """coords (N, 2) original pixels, labels (N,) -> ONNX outputs (masks, iou, low_res)."""
    coords = predictor.transform.apply_coords(coords.astype(np.float32), predictor.original_size)
    feeds = {
        "image_embeddings": predictor.get_image_embedding().numpy(),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, 4 * (SIZE // 16), 4 * (SIZE // 16)), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(predictor.original_size, np.float32),
    }
    return session.run(None, feeds)


def agreement(onnx_logits, ours_bool):
    return ((onnx_logits > 0) == ours_bool).mean()


BOX = np.array([60.0, 80.0, 300.0, 420.0])
POINTS = np.array([[200.0, 250.0], [120.0, 400.0]])


@pytest.mark.parametrize("prompt", ["box", "points"])
def test_all_masks_match_pytorch(exported, prompt):
    predictor, sessions = exported
    if prompt == "box":
        ours_multi, iou_multi, _ = predictor.predict(box=BOX, multimask_output=True)
        ours_single, iou_single, _ = predictor.predict(box=BOX, multimask_output=False)
        coords, labels = BOX.reshape(2, 2), np.array([2, 3])
    else:
        point_labels = np.array([1, 0])
        ours_multi, iou_multi, _ = predictor.predict(POINTS, point_labels, multimask_output=True)
        ours_single, iou_single, _ = predictor.predict(POINTS, point_labels, multimask_output=False)
        # No box: the caller appends the padding point, as with SAM's own ONNX decoder.
        coords, labels = np.concatenate([POINTS, [[0.0, 0.0]]]), np.array([1, 0, -1])
    masks, iou, low_res = run_onnx(sessions[False], predictor, coords, labels)
    H, W = predictor.original_size
    assert masks.shape == (1, 4, H, W) and iou.shape == (1, 4) and low_res.shape == (1, 4, 64, 64)
    means = [m.mean() for m in (*ours_single, *ours_multi)]
    assert sum(0.01 < m < 0.99 for m in means) >= 2, f"degenerate masks {means}: the comparison would be trivial"
    assert agreement(masks[0, 0], ours_single[0]) >= 0.999
    for k in range(3):
        assert agreement(masks[0, 1 + k], ours_multi[k]) >= 0.999
    np.testing.assert_allclose(iou[0], np.concatenate([iou_single, iou_multi]), atol=1e-4)


def test_single_mask_is_the_predictors_choice(exported):
    predictor, sessions = exported
    ours, scores, _ = predictor.predict(POINTS[:1], np.array([1]), multimask_output=True)
    masks, iou, _ = run_onnx(sessions[True], predictor, np.concatenate([POINTS[:1], [[0.0, 0.0]]]), np.array([1, -1]))
    best = int(np.argmax(scores))
    assert masks.shape[1] == 1 and iou[0, 0] == pytest.approx(scores[best], abs=1e-4)
    assert agreement(masks[0, 0], ours[best]) >= 0.999


def test_weights_for_another_model_type_is_a_clear_error(tmp_path):
    bad = tmp_path / "best.pth"
    torch.save({"format": "sam-partial-v1", "model_type": "vit_b",
                "model": {"mask_decoder.iou_token.weight": torch.zeros(1, 256)}}, bad)
    with pytest.raises(ValueError, match="vit_b"):
        export_onnx.main(["--checkpoint", "none", "--weights", str(bad), "--output", str(tmp_path / "d.onnx"), "--image_size", "256"])


def test_without_the_onnx_extra_one_line_names_it(tmp_path, monkeypatch):
    """Without onnx (a requirements.txt-only environment) the tool stops before loading the model,
    with one line naming the extra, and writes nothing."""
    real = export_onnx.importlib.util.find_spec
    monkeypatch.setattr(export_onnx.importlib.util, "find_spec", lambda name: None if name == "onnx" else real(name))
    with pytest.raises(ValueError, match=r'needs onnx: install the onnx extra, pip install -e "\.\[onnx\]"'):
        export_onnx.main(["--model_type", "vit_t", "--checkpoint", "none", "--output", str(tmp_path / "d.onnx")])
    assert not (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("opset, message", [
    (7, r"^--opset 7: the decoder's attention exports from opset 14 on$"),  # before the model loads
    (999, r"^--opset 999: torch .*'s ONNX exporter does not write it \(.*999\)$"),  # torch's own limit
])
def test_an_opset_the_export_cannot_use_is_one_line_naming_the_flag(tmp_path, opset, message):
    with pytest.raises(ValueError, match=message):
        export_onnx.main(["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "256", "--opset", str(opset),
                          "--output", str(tmp_path / "d.onnx")])
    assert not (tmp_path / "d.onnx").exists()
