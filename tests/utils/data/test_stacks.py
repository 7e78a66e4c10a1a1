"""--plane all: every plane of a z-stack or time series is a training item of its own. A small
folder of 16-bit TIFF stacks is generated here with known squares per plane, so the records, their
masks and the split are checked against what was written."""

import csv
import io
import json
import logging

import cv2
import numpy as np
import pytest
import tifffile

import run
from segment_anything.tools import evaluate, prepare
from segment_anything.tools._model import build_base
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import DataError, DataOptions, load_image, load_records, split_records
from segment_anything.utils.data.formats.folder import FolderRecord
from segment_anything.utils.data.prepare import prepare_data
from segment_anything.utils.data.image_io import kept_decoded, read_label
from segment_anything.utils.data.stacks import read_tiff, tiff_plane
from segment_anything.utils.image_spec import ImageSpec
from segment_anything.utils.save_weight import save_partial_weight

pytestmark = pytest.mark.usefixtures("one_thread")

S = 48  # pixels on a side
SQUARE = 8


def squares(count: int, column: int) -> np.ndarray:
    """(S, S) uint8 in {0, 255}: count squares down the given column slot, 4 pixels apart."""
    out = np.zeros((S, S), np.uint8)
    for j in range(count):
        out[4 + 12 * j : 4 + 12 * j + SQUARE, 4 + 10 * column : 4 + 10 * column + SQUARE] = 255
    return out


def image_of(labels: np.ndarray, rng) -> np.ndarray:
    """uint16 pixels: dim noise, bright where the labels are."""
    return (rng.integers(100, 200, labels.shape) + (labels > 0) * 3000).astype(np.uint16)


def make_stacks(root, label_planes_of_a: int = 3):
    """folder layout:
      a.tif  Z=3; label stack a.tif: plane k holds k squares (plane 0 is empty)
      b.tif  T=2, Z=2 (4 planes); one 2-D label b.png with 2 squares, for every plane
      c.png  a 2-D image with 3 squares
    """
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    a = np.stack([squares(k, k) for k in range(3)])
    tifffile.imwrite(root / "images" / "a.tif", image_of(a, rng), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(root / "labels" / "a.tif", a[:label_planes_of_a], photometric="minisblack")
    b = squares(2, 1)
    tifffile.imwrite(root / "images" / "b.tif", image_of(np.stack([b] * 4), rng).reshape(2, 2, S, S),
                     imagej=True, metadata={"axes": "TZYX"})
    cv2.imwrite(str(root / "labels" / "b.png"), b)
    c = squares(3, 2)
    cv2.imwrite(str(root / "images" / "c.png"), (image_of(c, rng) // 16).astype(np.uint8))
    cv2.imwrite(str(root / "labels" / "c.png"), c)
    return a, b, c


def test_a_record_per_plane_with_the_label_of_its_plane(tmp_path):
    a, b, c = make_stacks(tmp_path)
    records = load_records(tmp_path, "folder", DataOptions.from_flags("folder", plane="all"))
    got = [(r.image.rsplit("/", 1)[1], r.plane, r.num_objects) for r in records]
    # a's plane 0 has no object: left out; b's 2-D label serves all 4 planes; c is one 2-D image
    assert got == [("a.tif", 1, 1), ("a.tif", 2, 2)] + [("b.tif", k, 2) for k in range(4)] + [("c.png", None, 3)]
    for record in records:
        expected = {"a.tif": lambda k: a[k], "b.tif": lambda k: b, "c.png": lambda k: c}[record.image.rsplit("/", 1)[1]]
        union = record.load_masks().max(0)
        np.testing.assert_array_equal(union, expected(record.plane) > 0)
        spec = ImageSpec(plane=record.plane)
        np.testing.assert_array_equal(record.load_image(), load_image(record.image, spec))
    a2, b3 = records[1], records[5]
    assert a2.cache_parts() == {"plane": 2} and records[-1].cache_parts() == {}
    assert b3.describe() == f"{tmp_path / 'images' / 'b.tif'} plane 3 (T=1, Z=1)"
    assert not np.array_equal(records[2].load_image(), records[3].load_image())  # planes differ (noise)


def test_start_up_line_counts_stacks_and_planes_and_the_split_keeps_stacks_whole(tmp_path):
    make_stacks(tmp_path)
    spec = TrainConfig(checkpoint="none", train_dir=str(tmp_path), plane="all", val_fraction=0.4).resolve()
    data = prepare_data(spec.data)
    assert ("--plane all: 2 stack(s) -> 6 planes (1 without objects left out), and 1 2-D image(s); each plane is an "
            "image of its own: 7 images, 14 objects") in data.notes[0]
    assert "whole stacks: every plane of a file on one side" in data.notes[1]
    train_files, val_files = {r.image for r in data.train}, {r.image for r in data.val}
    assert not train_files & val_files and len(train_files | val_files) == 3


def test_the_seeded_split_draws_files_not_planes():
    records = [FolderRecord(f"s{i}.tif", (4, 4), "m", ("object",), image_spec=ImageSpec(plane=k))
               for i in range(10) for k in range(5)]
    train, val = split_records(records, 0.3, seed=21)
    assert len({r.image for r in val}) == 3 and len(val) == 15 and len(train) == 35
    assert not {r.image for r in train} & {r.image for r in val}
    assert split_records(list(reversed(records)), 0.3, seed=21) == (train, val)
    with pytest.raises(DataError, match="5 planes of one stack .*s0.tif.*give --val_dir"):
        split_records(records[:5])


def test_a_label_stack_of_another_plane_count_is_one_line_naming_both_files(tmp_path):
    make_stacks(tmp_path, label_planes_of_a=2)
    with pytest.raises(DataError) as err:
        load_records(tmp_path, "folder", DataOptions.from_flags("folder", plane="all"))
    lines = [line for line in str(err.value).splitlines() if "a.tif" in line]
    assert lines == [f"  {tmp_path / 'images' / 'a.tif'} has 3 planes, its label stack {tmp_path / 'labels' / 'a.tif'} "
                     "has 2: give one label plane per image plane, or one 2-D label for every plane"]


def test_a_bad_label_plane_is_named_with_the_file_and_the_plane(tmp_path):
    make_stacks(tmp_path)
    labels = tifffile.imread(tmp_path / "labels" / "a.tif")
    labels[2, 0, 0] = 7  # not a binary mask value, in plane 2 only
    tifffile.imwrite(tmp_path / "labels" / "a.tif", labels, photometric="minisblack")
    with pytest.raises(DataError) as err:
        load_records(tmp_path, "folder", DataOptions.from_flags("folder", plane="all"))
    images, labels = tmp_path / "images" / "a.tif", tmp_path / "labels" / "a.tif"
    assert f"  {images} plane 2: {labels}: mask is not binary" in str(err.value)


def test_flag_values():
    assert TrainConfig.parser().parse_args(["--plane", "all"]).plane == "all"
    assert TrainConfig.parser().parse_args(["--plane", "3"]).plane == 3
    with pytest.raises(ValueError, match="--plane must be a plane index"):
        TrainConfig(checkpoint="none", plane="top")
    assert ImageSpec.from_flags(plane="all") == ImageSpec(every=True)


def test_run_trains_on_every_plane(tmp_path):
    make_stacks(tmp_path / "data")
    out, cache = tmp_path / "run", tmp_path / "cache"
    run.main(["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "64", "--epoch", "1", "--batch_size", "2",
              "--dist", "false", "--num_workers", "0", "--output_dir", str(out), "--eval_base", "false",
              "--train_dir", str(tmp_path / "data"), "--plane", "all", "--cache_dir", str(cache)])
    (line,) = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(line["train_loss"]) and np.isfinite(line["val_loss"])
    log = (out / "train.log").read_text()
    assert "--plane all: 2 stack(s) -> 6 planes" in log
    # one embedding per plane (the plane is in the key), for every image of both splits
    assert len(list(cache.rglob("*.emb"))) == 7


def test_prepare_writes_every_plane(tmp_path):
    make_stacks(tmp_path / "data")
    prepare.main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--plane", "all"])
    entries = json.loads((tmp_path / "out" / "objects.json").read_text())
    entries = entries["images"] if isinstance(entries, dict) else entries
    assert [(e["image"], e.get("plane")) for e in entries] == [
        ("images/a_plane1.png", 1), ("images/a_plane2.png", 2)] + [
        (f"images/b_plane{k}.png", k) for k in range(4)] + [("images/c.png", None)]


def test_evaluate_scores_every_plane_and_resamples_files(tmp_path):
    make_stacks(tmp_path / "data")
    weights = save_partial_weight(build_base("vit_t", "none", 64), tmp_path / "best.pth",
                                  {"model_type": "vit_t", "image_size": 64}, keys=["mask_decoder"])
    summary = evaluate.main(["--checkpoint", "none", "--weights", str(weights), "--data_dir", str(tmp_path / "data"),
                             "--plane", "all", "--output_dir", str(tmp_path / "eval"), "--bootstrap", "20",
                             "--noc", "0", "--box_noise", "none", "--prompt_following", "False"])
    with open(tmp_path / "eval" / "per_object.csv") as f:
        names = sorted({row["image"] for row in csv.DictReader(f)})
    a, b = tmp_path / "data" / "images" / "a.tif", tmp_path / "data" / "images" / "b.tif"
    assert names == [f"{a} plane 1", f"{a} plane 2"] + [f"{b} plane {k}" for k in range(4)] + [
        str(tmp_path / "data" / "images" / "c.png")]
    assert summary["data"]["objects"] == 14 and summary["data"]["images"] == 3  # the intervals resample files


@pytest.mark.parametrize("shape, dtype, options", [
    ((3, 2, 8, 9), np.uint16, dict(imagej=True, metadata={"axes": "ZCYX"})),
    ((2, 2, 3, 8, 9), np.uint16, dict(imagej=True, metadata={"axes": "TZCYX"})),
    ((2, 3, 8, 9), np.float32, dict(photometric="minisblack", metadata={"axes": "TZYX"})),
    ((3, 8, 9), np.uint8, dict(photometric="minisblack")),
    ((2, 8, 9, 4), np.uint8, dict(photometric="rgb", extrasamples=["unassalpha"])),
    ((4, 8, 9), np.uint16, dict(photometric="minisblack", metadata={"axes": "CYX"})),  # one plane: no shortcut
])
def test_one_plane_read_from_its_own_pages_is_the_plane_of_the_whole_file(shape, dtype, options):
    data = io.BytesIO()
    tifffile.imwrite(data, (np.random.default_rng(0).random(shape) * 200).astype(dtype), **options)
    data = data.getvalue()
    whole = read_tiff(data, "x.tif")
    for k in range(whole.count + 1):
        one = tiff_plane(data, k)
        if k == whole.count or whole.count == 1:
            assert one is None  # the whole file is read, and says what is wrong
            continue
        array, where, alpha, orientation = one
        np.testing.assert_array_equal(array, whole.array[k])
        assert (where, alpha, orientation) == (whole.where(k), whole.alpha, 1)


def test_a_plane_read_alone_is_the_plane_the_whole_file_gives(tmp_path):
    """load_image and read_label of one plane (its pages alone) against the same read with the
    whole file decoded (kept_decoded, as the data check reads), an orientation tag included."""
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "s.tif", rng.integers(0, 4000, (3, 2, 12, 16), dtype=np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"}, extratags=[(274, "H", 1, 6, True)])  # rotated 90 degrees
    tifffile.imwrite(tmp_path / "l.tif", rng.integers(0, 5, (3, 12, 16), dtype=np.uint8), photometric="minisblack")
    spec = ImageSpec(channels=(0, 1, 1), plane=2)
    alone, label = load_image(tmp_path / "s.tif", spec), read_label(tmp_path / "l.tif", 1)
    with kept_decoded():
        np.testing.assert_array_equal(alone, load_image(tmp_path / "s.tif", spec))
        np.testing.assert_array_equal(label, read_label(tmp_path / "l.tif", 1))
    assert alone.shape == (16, 12, 3)  # the orientation tag applied


def test_a_damaged_tiff_is_one_named_problem_without_the_readers_own_messages(tmp_path, capfd):
    """tifffile logs a warning and OpenCV prints its TIFF errors while they fail on the file;
    only the problem naming it is shown."""
    from segment_anything.utils.data.checks import BadSample
    from segment_anything.utils.data.image_io import load_image

    path = tmp_path / "damaged.tif"
    path.write_bytes(b"II*\x00garbage after the header")
    with pytest.raises(BadSample, match="damaged.tif: cannot read TIFF"):
        load_image(path)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert logging.getLogger("tifffile").level == logging.NOTSET  # put back
