"""Images for the model are read as training read them: best.pth records how (--channels,
--intensity_range, --plane) and every tool uses that by default; a flag given wins."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from segment_anything.tools import evaluate, ncut, predict
from segment_anything.utils.data import load_image

RANGE = "0,4095"  # 12-bit data; the images below span 1000..3000, so 'auto' would stretch them otherwise


def deep_dataset(root, n, seed):
    """A folder data set of 64 x 64 16-bit images holding 12-bit values (a bright square on a
    dimmer ground), with the square as the mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = rng.integers(1000, 1400, (64, 64), dtype=np.uint16)
        mask = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(8, 30, 2)
        image[y : y + 24, x : x + 24] = 3000
        mask[y : y + 24, x : x + 24] = 255
        cv2.imwrite(str(root / "images" / f"{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{i}.png"), mask)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    train, val = deep_dataset(root / "train", 3, 0), deep_dataset(root / "val", 1, 1)
    out = root / "run"
    flags = {"checkpoint": "none", "model_type": "vit_t", "image_size": 64, "train_dir": train, "val_dir": val,
             "dist": "0", "num_workers": 0, "epoch": 1, "eval_base": "false", "val_clicks": "",
             "intensity_range": RANGE, "output_dir": out}
    cmd = [sys.executable, str(REPO / "run.py"), *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, val / "images" / "0.png"


def test_best_pth_records_how_images_were_read(run_dir):
    best = torch.load(run_dir[0] / "best.pth", map_location="cpu", weights_only=True)
    assert best["intensity_range"] == RANGE


def test_predict_evaluate_and_ncut_read_images_with_the_recorded_range(run_dir, tmp_path, capsys):
    out, image = run_dir
    as_trained, auto = load_image(image, (0, 4095)), load_image(image)
    assert (as_trained != auto).any()
    model = ["--model_type", "vit_t", "--checkpoint", "none", "--weights", str(out / "best.pth")]

    predict.main(model + ["--image", str(image), "--box", "2,2,20,20", "--output", str(tmp_path / "p")])
    assert f"--intensity_range {RANGE}" in capsys.readouterr().out
    overlay = cv2.cvtColor(cv2.imread(str(tmp_path / "p" / "0_overlay.png")), cv2.COLOR_BGR2RGB)
    untouched = cv2.imread(str(tmp_path / "p" / "0_mask_0.png"), cv2.IMREAD_UNCHANGED) == 0
    untouched[:22, :22] = False  # the prompt box is drawn there
    assert untouched.sum() > 1000 and (overlay[untouched] == as_trained[untouched]).all()

    predict.main(model + ["--image", str(image), "--box", "2,2,20,20", "--intensity_range", "auto",
                          "--output", str(tmp_path / "q")])
    overlay = cv2.cvtColor(cv2.imread(str(tmp_path / "q" / "0_overlay.png")), cv2.COLOR_BGR2RGB)
    untouched = cv2.imread(str(tmp_path / "q" / "0_mask_0.png"), cv2.IMREAD_UNCHANGED) == 0
    untouched[:22, :22] = False
    assert (overlay[untouched] == auto[untouched]).all()  # a flag given wins

    evaluate.main(model + ["--data_dir", str(image.parent.parent), "--output_dir", str(tmp_path / "e"),
                           "--bootstrap", "10"])
    assert f"--intensity_range {RANGE}" in capsys.readouterr().out

    args = ncut.parser().parse_args(["--image", str(image), "--weights", str(out / "best.pth"), "--image_sizes", "64",
                                     "--layers", "0"])
    assert (ncut.check_args(args)[0] == as_trained).all()
