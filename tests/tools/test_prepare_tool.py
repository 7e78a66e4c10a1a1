"""tools/prepare.py: the plain layout, objects.json and overlays, from generated and real data."""

import json

import cv2
import numpy as np
import pytest

from conftest import require_shared_data
from segment_anything.tools import prepare
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import load_records


def test_prepare_writes_one_mask_per_object_and_overlays(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n=2, size_range=(60, 80), seed=4, kind="instance_map", objects=3)
    out = tmp_path / "out"
    assert prepare.main(["--data_dir", str(root), "--data_format", "instance_map", "--output_dir", str(out), "--visualize"]) == 0
    info = json.loads((out / "objects.json").read_text())
    assert info["format"] == "instance_map" and len(info["images"]) == 2
    records = load_records(root, "instance_map")
    for entry, record in zip(info["images"], records):
        image = cv2.cvtColor(cv2.imread(str(out / entry["image"])), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(image, record.load_image())
        assert len(entry["objects"]) == 3
        for obj, mask in zip(entry["objects"], record.load_masks()):
            written = cv2.imread(str(out / obj["mask"]), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(written, mask * 255)
            ys, xs = np.nonzero(mask)
            assert obj["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] and obj["area"] == mask.sum()
            ((x, y, label),) = obj["points"]  # default: one centre point, inside its object
            assert label == 1 and mask[int(y), int(x)] == 1
        drawn = cv2.imread(str(out / "overlays" / entry["image"].split("/")[1]))
        x0, y0 = (int(v) for v in entry["objects"][0]["box"][:2])
        assert (drawn[y0, x0:x0 + 3] != cv2.cvtColor(image, cv2.COLOR_RGB2BGR)[y0, x0:x0 + 3]).any()  # the box edge


def test_prepare_coco_skip_bad_lists_the_empty_images(tmp_path):
    tiny = require_shared_data("tinycoco")
    ann = tiny / "annotations" / "instances_train2017.json"
    args = ["--json", str(ann), "--images", str(tiny / "images" / "train2017"), "--output_dir", str(tmp_path / "o"),
            "--categories", "person"]
    with pytest.raises(SystemExit) as info:
        prepare.main(args)
    assert "000000226111.jpg" in str(info.value.code) and "--skip_bad" in str(info.value.code)
    prepare.main(args + ["--skip_bad"])
    info = json.loads((tmp_path / "o" / "objects.json").read_text())
    assert {o["category"] for e in info["images"] for o in e["objects"]} == {"person"}
    assert "000000226111.jpg" in (tmp_path / "o" / "skipped.txt").read_text()
