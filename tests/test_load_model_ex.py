"""load_model_ex.py with this package: model type and input size from best.pth, last.pth accepted,
clear errors. Meta's package is covered by tests/test_stock_sam.py. vit_t at 64 px: a few seconds per run."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.data import load_image
from segment_anything.utils.save_weight import load_partial_weight, save_partial_weight

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
    if "--image" in args[:-1]:
        cmd[4:6] = []
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


@pytest.mark.parametrize("args, message", [
    (["--output", "mask.txt"], "error: --output mask.txt: OpenCV cannot write an image with that name's extension (use .png)"),
    (["--output", "gone/mask.png"], "error: --output gone/mask.png: its folder does not exist"),
    (["--logits", "gone/x.npy"], "error: --logits gone/x.npy: its folder does not exist"),
    (["--box", "100", "60", "120", "70"], "error: --box 100 60 120 70: a box must have x0 <= x1 and y0 <= y1 and overlap the 80x48 image"),
    (["--box", "30", "5", "10", "20"], "error: --box 30 5 10 20: a box must have x0 <= x1 and y0 <= y1 and overlap the 80x48 image"),
])
def test_an_output_or_box_that_cannot_be_used_is_one_line_before_the_model(files, args, message):
    root, _ = files
    result = example(root, "--weights", root / "best.pth", *args)
    assert result.returncode == 1 and result.stderr.strip() == message, result.stderr


def test_checkpoint_none_and_a_missing_checkpoint(files, tmp_path):
    """'none' is the seeded random model every other tool accepts; a missing file is one line."""
    root, _ = files
    cmd = [sys.executable, str(REPO / "load_model_ex.py"), "--weights", str(root / "best.pth"),
           "--image", str(root / "image.png"), "--output", str(tmp_path / "mask.png")]
    ran = subprocess.run(cmd + ["--checkpoint", "none"], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert "random" in ran.stdout and (tmp_path / "mask.png").is_file()
    missing = subprocess.run(cmd + ["--checkpoint", str(tmp_path / "gone.pth")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr
    assert missing.stderr.strip() == f"error: --checkpoint {tmp_path / 'gone.pth'} not found"


def test_the_script_says_which_package_it_runs(files, tmp_path):
    """--package picks this repository's segment_anything (default) or the installed one, whatever
    sys.path holds, and the first line printed names the one that ran."""
    root, _ = files
    help_text = subprocess.run([sys.executable, str(REPO / "load_model_ex.py"), "--help"], capture_output=True,
                               text=True, timeout=300).stdout
    assert "--package" in help_text and "installed" in help_text
    ours = example(root, "--weights", root / "best.pth")
    assert ours.stdout.splitlines()[0] == f"segment_anything: this repository's ({REPO / 'segment_anything'})"
    meta = REPO / ".oracle" / "segment-anything-1.0"
    if not (meta / "segment_anything").is_dir():
        pytest.skip(f"Meta's package is not in {meta}")
    env = {**os.environ, "PYTHONPATH": str(meta)}
    cmd = [sys.executable, str(REPO / "load_model_ex.py"), "--package", "installed", "--checkpoint",
           str(root / "mobile_sam.pt"), "--weights", str(root / "best.pth"), "--image", str(root / "image.png")]
    installed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert installed.stdout.splitlines()[0] == f"segment_anything: installed ({meta / 'segment_anything'})"
    # Meta's package has no vit_t: one line saying so, no traceback.
    assert installed.returncode != 0 and "Traceback" not in installed.stderr, installed.stderr
    assert "which this segment_anything does not have" in installed.stderr


def test_a_16_bit_image_is_read_as_training_reads_it(files, tmp_path):
    """12-bit data in a 16-bit PNG: stretched to 0..255 by its own range (training's 'auto'), or
    by the range best.pth was trained with, or by --intensity_range; never cut to its top 8 bits."""
    root, _ = files
    image = np.random.default_rng(3).integers(0, 4096, (48, 80), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), image)
    sam = sam_model_registry["vit_t"](checkpoint=str(root / "mobile_sam.pt"), image_size=SIZE)
    load_partial_weight(sam, root / "best.pth")
    predictor = SamPredictor(sam.eval())
    box = np.array([0.1 * 80, 0.1 * 48, 0.9 * 80, 0.9 * 48])
    ranged = tmp_path / "ranged.pth"
    save_partial_weight(sam, ranged, metadata={"model_type": "vit_t", "image_size": SIZE, "intensity_range": "0,8191"},
                        keys=["mask_decoder"])
    for weights, flags, expected_range in ((root / "best.pth", [], None), (ranged, [], (0, 8191)),
                                           (ranged, ["--intensity_range", "100,3000"], (100, 3000))):
        predictor.set_image(load_image(tmp_path / "deep.png", expected_range))
        expected = predictor.predict(box=box, multimask_output=False, return_logits=True)[0][0]
        result = example(root, "--weights", weights, "--image", tmp_path / "deep.png", "--logits", tmp_path / "l.npy",
                         *flags)
        assert result.returncode == 0, result.stderr
        assert np.abs(np.load(tmp_path / "l.npy") - expected).max() < 1e-5, (weights, flags)
    bad = example(root, "--weights", root / "best.pth", "--intensity_range", "5,1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--intensity_range" in bad.stderr
