"""A short training run from every data format, through run.py's own entry point (in-process,
one process: the multi-process machinery is tested in test_run.py). Small subsets of the real
datasets are linked into temporary folders; vit_t with random weights at 64 pixels, 1 epoch."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import run
from conftest import require_shared_data
from segment_anything.utils.data import make_synthetic_dataset



pytestmark = pytest.mark.usefixtures("one_thread")


def train(tmp_path, *flags) -> Path:
    out = tmp_path / "run"
    run.main(["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "64", "--epoch", "1",
              "--batch_size", "2", "--dist", "false", "--num_workers", "0", "--output_dir", str(out), "--eval_base", "false", *map(str, flags)])
    (line,) = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(line["train_loss"]) and np.isfinite(line["val_loss"]) and (out / "best.pth").is_file()
    return out


def link_subset(src: Path, dst: Path, names) -> Path:
    for name in names:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / name.name).symlink_to(name)
    return dst


def nails_subset(tmp_path) -> Path:
    nails = require_shared_data("nails")
    images = sorted((nails / "images").iterdir())[:3]
    root = tmp_path / "nails"
    link_subset(nails, root / "images", images)
    link_subset(nails, root / "labels", [nails / "labels" / p.name for p in images])
    return root


def test_folder_nails(tmp_path):
    log = (train(tmp_path, "--train_dir", nails_subset(tmp_path)) / "train.log").read_text()
    assert "instance mode per_object" in log and "--instance_mode per_image" in log
    assert "folder format, 3 images, 18 objects (per image min 4, median 5, max 9)" in log


def test_labelme_embedded(tmp_path):
    nuts = require_shared_data("labelme-nuts")
    root = tmp_path / "nuts"
    root.mkdir()
    for name in ("0.json", "16.json", "6.json"):
        shutil.copy(nuts / "images" / name, root / name)  # the images come from imageData
    log = (train(tmp_path, "--train_dir", root) / "train.log").read_text()
    assert "labelme format, 3 images, 20 objects" in log


def test_coco_with_crowd_and_an_empty_image(tmp_path):
    tiny = require_shared_data("tinycoco")
    data = json.loads((tiny / "annotations" / "instances_train2017.json").read_text())
    keep = {386912, 226111, 87038}  # two with a crowd region each, one without annotations
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    out = train(tmp_path, "--train_json", ann, "--train_images", tiny / "images" / "train2017", "--skip_bad", "true")
    log = (out / "train.log").read_text()
    assert "dropped objects: 2 crowd region (iscrowd)" in log
    assert "skipped 1 of 3 images: 1 no objects" in log
    assert "000000226111.jpg" in (out / "skipped.txt").read_text()


@pytest.mark.parametrize("kind", ["objects", "instance_map"])
def test_generated_objects_and_instance_map(tmp_path, kind):
    root = make_synthetic_dataset(tmp_path / kind, n=4, size_range=(48, 80), seed=1, kind=kind, objects=3)
    log = (train(tmp_path, "--train_dir", root, "--data_format", kind) / "train.log").read_text()
    assert f"{kind} format, 4 images, 12 objects (per image min 3, median 3, max 3)" in log


def test_skip_bad_trains_on_the_rest(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", n=4, size_range=(48, 64), seed=2)
    (root / "labels" / "0003.png").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        run.main(["--train_dir", str(root), "--checkpoint", "none", "--output_dir", str(tmp_path / "no")])
    assert str(root / "labels" / "0003.png") in str(info.value.code) and not (tmp_path / "no").exists()
    out = train(tmp_path, "--train_dir", root, "--skip_bad", "yes", "--instance_mode", "per_image")
    assert (out / "skipped.txt").read_text() == f"{root / 'labels' / '0003.png'}: file is empty (0 bytes)\n"
    log = (out / "train.log").read_text()
    assert f"skipped 1 of 4 images: 1 zero-byte file; full list in {out / 'skipped.txt'}" in log
    assert "2 train / 1 val images" in log and "instance mode per_image" in log
    assert os.path.getsize(out / "best.pth") > 0
