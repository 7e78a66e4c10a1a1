"""The evaluation tool: same prompts for both models, paired differences, outputs, forgetting check."""

import csv
import json

import cv2
import numpy as np
import pytest

from conftest import require_shared_data
from segment_anything.tools import evaluate
from segment_anything.tools._model import build_base
from segment_anything.tools._stats import bootstrap_mean
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import save_partial_weight

SIZE = 256


def weights_file(path, seed=None):
    """A best.pth for the seeded random base: its own decoder (seed None) or a random one."""
    sam = build_base("vit_t", "none", SIZE)
    if seed is not None:
        randomize_(sam.mask_decoder, seed=seed)
    return save_partial_weight(sam, path, {"model_type": "vit_t", "image_size": SIZE}, keys=["mask_decoder"])


def run(tmp_path, weights, *extra):
    out = tmp_path / "eval"
    summary = evaluate.main(["--checkpoint", "none", "--weights", str(weights), "--output_dir", str(out),
                             "--bootstrap", "200", *map(str, extra)])
    with open(out / "per_object.csv") as f:
        rows = list(csv.DictReader(f))
    return summary, rows, out


def test_tuned_vs_base_with_clicks_and_reference(tmp_path):
    nails, nuts = require_shared_data("nails"), require_shared_data("labelme-nuts")
    summary, rows, out = run(tmp_path, weights_file(tmp_path / "best.pth", seed=4), "--data_dir", nails,
                             "--split", "val", "--max_images", 2, "--prompt", "box+point", "--clicks", "1,2",
                             "--reference_data", nuts, "--max_images", 1)
    data = [r for r in rows if r["dataset"] == "data"]
    base, tuned = ([r for r in data if r["model"] == m] for m in ("base", "tuned"))
    assert len(base) == len(tuned) == summary["data"]["objects"] > 0
    assert [(r["image"], r["object"]) for r in base] == [(r["image"], r["object"]) for r in tuned]
    for name in ("iou", "dice", "boundary_iou", "iou_click1", "iou_click2"):
        stats = summary["data"]["tuned"][name]
        assert stats["mean"] == pytest.approx(np.mean([float(r[name]) for r in tuned]), abs=1e-6)
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
        diff = np.mean([float(t[name]) - float(b[name]) for b, t in zip(base, tuned)])
        assert summary["data"]["difference"][name]["mean"] == pytest.approx(diff, abs=1e-6)
    assert summary["reference"]["objects"] == len([r for r in rows if r["dataset"] == "reference"]) // 2
    assert summary["forgetting"]["iou"] == summary["reference"]["difference"]["iou"]
    picture = cv2.imread(str(out / "compare.png"))
    assert picture is not None and picture.shape[1] == 4 * 162 and picture.std() > 10
    assert json.loads((out / "summary.json").read_text())["clicks"] == [1, 2]


def test_same_weights_give_zero_difference(tmp_path):
    """Both models see exactly the same prompts: with the base's own decoder as 'fine-tuned',
    every object scores the same, also with random point prompts."""
    nails = require_shared_data("nails")
    summary, rows, _ = run(tmp_path, weights_file(tmp_path / "same.pth"), "--data_dir", nails, "--max_images", 2,
                           "--prompt", "point")
    base = [r for r in rows if r["model"] == "base"]
    tuned = [r for r in rows if r["model"] == "tuned"]
    assert [r["iou"] for r in base] == [r["iou"] for r in tuned]
    assert summary["data"]["difference"]["iou"]["mean"] == 0.0


def test_bad_input_is_reported_before_models_load(tmp_path):
    with pytest.raises(ValueError, match="--clicks"):
        evaluate.main(["--checkpoint", "none", "--weights", "x.pth", "--data_dir", str(tmp_path), "--clicks", "0,2",
                       "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="COCO JSON needs"):
        evaluate.main(["--checkpoint", "none", "--weights", "x.pth", "--data_dir", str(tmp_path / "a.json"),
                       "--output_dir", str(tmp_path)])


def test_bootstrap_by_hand():
    # Two images: values [1, 1] and [0]; object mean 2/3. Resamples are {A, A}: 1, {B, B}: 0,
    # {A, B}: 2/3, so the interval lies in [0, 1] and covers 2/3.
    stats = bootstrap_mean([1.0, 1.0, 0.0], ["a", "a", "b"], n_resamples=500, seed=1)
    assert stats["mean"] == pytest.approx(2 / 3) and stats["n"] == 3
    assert 0.0 <= stats["ci_low"] <= 2 / 3 <= stats["ci_high"] <= 1.0
    constant = bootstrap_mean([0.5] * 6, list("aabbcc"), n_resamples=50)
    assert constant["ci_low"] == constant["ci_high"] == 0.5
    assert bootstrap_mean([float("nan")], ["a"])["n"] == 0
