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
    # The literature protocols cost ~2 x --noc decoder calls per object: off unless a test asks.
    cheap = ["--noc", "0", "--box_noise", "none", "--prompt_following", "False"]
    summary = evaluate.main(["--checkpoint", "none", "--weights", str(weights), "--output_dir", str(out),
                             "--bootstrap", "200", *cheap, *map(str, extra)])
    with open(out / "per_object.csv") as f:
        rows = list(csv.DictReader(f))
    return summary, rows, out


def test_tuned_vs_base_with_clicks_and_reference(tmp_path):
    nails, nuts = require_shared_data("nails"), require_shared_data("labelme-nuts")
    summary, rows, out = run(tmp_path, weights_file(tmp_path / "best.pth", seed=4), "--data_dir", nails,
                             "--split", "val", "--max_images", 2, "--prompt", "box+point", "--clicks", "1,2",
                             "--reference_data", nuts)
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
    weights = str(weights_file(tmp_path / "best.pth"))  # the weights file is checked first
    with pytest.raises(ValueError, match="--clicks"):
        evaluate.main(["--checkpoint", "none", "--weights", weights, "--data_dir", str(tmp_path), "--clicks", "0,2",
                       "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="COCO JSON needs"):
        evaluate.main(["--checkpoint", "none", "--weights", weights, "--data_dir", str(tmp_path / "a.json"),
                       "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--data_dir .* is required"):
        evaluate.main(["--checkpoint", "none", "--weights", weights, "--output_dir", str(tmp_path)])


def test_bootstrap_by_hand():
    # Two images: values [1, 1] and [0]; object mean 2/3. Resamples are {A, A}: 1, {B, B}: 0,
    # {A, B}: 2/3, so the interval lies in [0, 1] and covers 2/3.
    stats = bootstrap_mean([1.0, 1.0, 0.0], ["a", "a", "b"], n_resamples=500, seed=1)
    assert stats["mean"] == pytest.approx(2 / 3) and stats["n"] == 3
    assert 0.0 <= stats["ci_low"] <= 2 / 3 <= stats["ci_high"] <= 1.0
    constant = bootstrap_mean([0.5] * 6, list("aabbcc"), n_resamples=50)
    assert constant["ci_low"] == constant["ci_high"] == 0.5
    assert bootstrap_mean([float("nan")], ["a"])["n"] == 0


def test_one_image_has_no_interval_and_says_so(tmp_path, capsys):
    """The bootstrap resamples images: over one image every resample is that image, and the
    'interval' would be a point. Each statistic states how many images it rests on."""
    one = bootstrap_mean([0.2, 0.9, 0.4], ["a", "a", "a"], n_resamples=50)
    assert one["images"] == 1 and one["mean"] == pytest.approx(0.5)
    assert one["ci_low"] is None and one["ci_high"] is None
    assert bootstrap_mean([1.0, 0.0, float("nan")], ["a", "b", "c"])["images"] == 2
    nails = require_shared_data("nails")
    summary, _, _ = run(tmp_path, weights_file(tmp_path / "best.pth", seed=4), "--data_dir", nails,
                        "--max_images", 1)
    out = capsys.readouterr().out
    assert "warning: one image" in out and "no interval" in out
    assert summary["data"]["tuned"]["iou"]["images"] == 1
    assert summary["data"]["tuned"]["iou"]["ci_low"] is None


def test_compare_rows_are_labelled_gain_or_loss_and_the_point_leaves_a_small_object_visible():
    """A 4 x 4 object in a 200 x 200 image with a point prompt at its centre: the first column
    must still show the object; every row says whether it is a gain or a loss."""
    magenta = (255, 0, 255)
    image = np.zeros((200, 200, 3), np.uint8)
    image[100:104, 100:104] = magenta
    target = np.zeros((200, 200), bool)
    target[100:104, 100:104] = True

    class Record:
        def load_image(self):
            return image

        def load_masks(self, objects=None):
            return target[None].astype(np.uint8)

    prompts = [{"image_index": 0, "object": 0, "box": None, "points": np.array([[102.0, 102.0]], np.float32),
                "labels": np.array([1])}] * 3
    packed = np.packbits(target)
    results = {"base": [{"iou": v, "mask": packed} for v in (0.2, 0.5, 0.9)],
               "tuned": [{"iou": v, "mask": packed} for v in (0.8, 0.5, 0.4)]}

    def object_pixels(prompts):
        first_cell = evaluate.compare_picture([Record()], prompts, results, 1)[22:22 + 160, :160]
        return (np.abs(first_cell.astype(int) - magenta).sum(-1) < 60).sum()

    unmarked = object_pixels([dict(p, points=None, labels=None) for p in prompts])
    assert unmarked > 100
    assert object_pixels(prompts) > 0.6 * unmarked
    labels = [label for _, label in evaluate.compare_rows(results, 1)]
    assert labels[0].startswith("gain +0.60") and labels[1].startswith("loss -0.50")


def test_literature_protocols_are_in_the_summary_csv_and_picture(tmp_path):
    """NoC, box noise, prompt following, automatic-mask AP and the by-size tables: with the base's
    own decoder as 'fine-tuned' every one of them is the same for both models, the summary's
    means are the CSV's, and each NoC lies within 1..cap."""
    nails = require_shared_data("nails")
    summary, rows, out = run(tmp_path, weights_file(tmp_path / "same.pth"), "--data_dir", nails, "--max_images", 1,
                             "--noc", 3, "--box_noise", "0,20", "--prompt_following", "True", "--amg",
                             "--amg_points_per_side", 4)
    names = ["noc85_point", "noc90_point", "noc85_box", "noc90_box", "iou_box_noise0", "iou_box_noise20",
             "box_outside_fraction", "background_point_area", "background_point_fraction"]
    data = summary["data"]
    base = [r for r in rows if r["model"] == "base"]
    for name in names:
        assert data["difference"][name]["mean"] == 0.0, name
        values = [float(r[name]) for r in base if r[name] != "nan"]
        assert data["base"][name]["mean"] == pytest.approx(np.mean(values), abs=1e-6), name  # the CSV has 6 decimals
    assert all(1 <= float(r["noc90_box"]) <= 3 and float(r["noc85_box"]) <= float(r["noc90_box"]) for r in base)
    # The background point is one value per image, not per object.
    assert data["base"]["background_point_area"]["n"] == data["images"]
    assert set(data["by_size"]) <= {"small", "medium", "large"}
    assert sum(part["objects"] for part in data["by_size"].values()) == data["objects"]
    assert {r["size"] for r in base} == set(data["by_size"])
    amg = summary["automatic_masks"]
    assert amg["base"] == amg["tuned"] and 0.0 <= amg["base"]["ap"] <= 1.0 and amg["base"]["objects"] == len(base)
    picture = cv2.imread(str(out / "clicks.png"))
    assert picture is not None and picture.std() > 10
