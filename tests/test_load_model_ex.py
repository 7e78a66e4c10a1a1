"""load_model_ex.py with this package: model type and input size from best.pth, last.pth accepted,
clear errors. Meta's package is covered by tests/test_stock_sam.py. vit_t at 64 px: a few seconds per run."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import save_partial_weight

SIZE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An "official" vit_t file, a best.pth at 64 px with a changed decoder, a last.pth, an image, and the
    mask our predictor gives with the tuned decoder at 64 px."""
    root = tmp_path_factory.mktemp("example")
    sam = randomize_(sam_model_registry["vit_t"](image_size=SIZE), seed=0)
    torch.save(sam.state_dict(), root / "mobile_sam.pt")
    for name, p in sam.named_parameters():
        p.requires_grad_(name.startswith("mask_decoder."))
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    save_partial_weight(sam, root / "best.pth", metadata={"model_type": "vit_t", "image_size": SIZE, "epoch": 3})
    decoder = {k: v for k, v in sam.state_dict().items() if k.startswith("mask_decoder.")}
    torch.save({"format": "sam-resume-v1", "model": decoder, "optimizer": {}, "scheduler": {}, "epoch": 4,
                "rng": [{"numpy": np.random.get_state()}], "args": {"model_type": "vit_t", "image_size": SIZE}},
               root / "last.pth")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "image.png"), image)
    predictor = SamPredictor(sam.eval())
    predictor.set_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    box = np.array([0.1 * 80, 0.1 * 48, 0.9 * 80, 0.9 * 48])
    expected = predictor.predict(box=box, multimask_output=False)[0][0]
    return root, expected


def example(root, *args):
    cmd = [sys.executable, str(REPO / "load_model_ex.py"), "--checkpoint", str(root / "mobile_sam.pt"),
           "--image", str(root / "image.png"), "--output", str(root / "mask.png"), *map(str, args)]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("weights", ["best.pth", "last.pth"])
def test_model_type_and_size_come_from_the_file(files, weights):
    root, expected = files
    (root / "mask.png").unlink(missing_ok=True)
    result = example(root, "--weights", root / weights)  # no --model_type, no --image_size
    assert result.returncode == 0, result.stderr
    assert f"vit_t at {SIZE} px: predicted IoU" in result.stdout
    if weights == "last.pth":
        assert "resume file (last.pth, after epoch 4)" in result.stdout
    mask = cv2.imread(str(root / "mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert (mask == expected).mean() >= 0.999


def test_flags_that_disagree_with_the_file_are_errors_naming_both(files):
    root, _ = files
    for flag, value, stored in (("--model_type", "vit_b", "vit_t"), ("--image_size", 1024, SIZE)):
        result = example(root, "--weights", root / "best.pth", flag, value)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert f"{flag} {value}, but {root / 'best.pth'} was trained with {flag[2:]} {stored}" in result.stderr


def test_a_file_that_is_no_checkpoint_is_named(files, tmp_path):
    root, _ = files
    (tmp_path / "best.pth").write_text("not weights")
    result = example(root, "--weights", tmp_path / "best.pth")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"--weights {tmp_path / 'best.pth'} is not a PyTorch checkpoint" in result.stderr
