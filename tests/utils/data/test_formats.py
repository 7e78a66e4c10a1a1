"""The objects, instance_map, labelme and coco formats on real data and on hand-made files."""

import base64
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import require_shared_data
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import DataError, DataOptions, load_image, load_records, mask_to_box
from segment_anything.utils.data.formats import detect
from segment_anything.utils.data.prepare import load_split

TINYCOCO_CROWD = {908400386912, 900100296649, 900100463730, 900100087038}  # iscrowd in instances_train2017.json
TINYCOCO_EMPTY = {"000000226111.jpg", "000000058636.jpg"}  # train images without annotations


# ----------------------------------------------------------------------------- objects / instance_map


def test_nuclei_objects_and_instances_agree(tmp_path):
    objects, instances = require_shared_data("nuclei-objects"), require_shared_data("nuclei-instances")
    b = load_split("instance_map", str(instances), DataOptions())
    assert b.fmt == "instance_map" and b.problems == []
    counts = sorted(r.num_objects for r in b.records)
    assert len(counts) == 12 and sum(counts) == 440 and (counts[0], counts[-1]) == (10, 179)
    # The two images with fewest nuclei, in the objects layout (a subset keeps the test fast).
    few = sorted(b.records, key=lambda r: r.num_objects)[:2]
    for rec in few:
        (folder,) = [d for d in objects.iterdir() if d.name.startswith(Path(rec.image).stem)]
        (tmp_path / folder.name).symlink_to(folder)
    a = load_split("auto", str(tmp_path), DataOptions())
    assert a.fmt == "objects" and a.problems == []
    for rec_a, rec_b in zip(a.records, sorted(few, key=lambda r: r.image)):
        assert Path(rec_a.image).stem[:16] == Path(rec_b.image).stem
        np.testing.assert_array_equal(rec_a.load_image(), rec_b.load_image())
        # Every instance-map object is exactly one of the object files.
        files = {cv2.imread(p, cv2.IMREAD_GRAYSCALE).astype(bool).tobytes() for p in rec_a.objects}
        assert len(files) == rec_a.num_objects == rec_b.num_objects
        assert {m.astype(bool).tobytes() for m in rec_b.load_masks()} == files


@pytest.mark.parametrize("kind", ["folder", "objects", "instance_map"])
def test_synthetic_multi_object_sets(tmp_path, kind):
    root = make_synthetic_dataset(tmp_path / kind, n=3, size_range=(64, 96), seed=2, kind=kind, objects=5)
    fmt = "instance_map" if kind == "instance_map" else "auto"
    loaded = load_split(fmt, str(root), DataOptions())
    assert loaded.fmt == kind and loaded.problems == []
    assert [r.num_objects for r in loaded.records] == [5, 5, 5]
    masks = loaded.records[0].load_masks()
    assert masks.shape[0] == 5 and masks.sum(0).max() == 1  # separate, non-overlapping objects


def test_instance_map_values_and_foreground_values(tmp_path):
    labels = np.zeros((30, 40), np.uint16)
    labels[2:8, 2:8], labels[10:20, 10:30], labels[25:28, 1:4] = 7, 300, 2
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.tif"), np.full((30, 40, 3), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "gt" / "a.png"), labels)
    (record,) = load_records(tmp_path, "instance_map")
    assert record.objects == (2, 7, 300)
    np.testing.assert_array_equal(record.load_masks([2])[0], labels == 300)
    (only,) = load_records(tmp_path, "instance_map", DataOptions("instance_map", foreground_values=(7,)))
    assert only.objects == (7,)
    with pytest.raises(DataError, match="never guessed"):
        detect(tmp_path / "img")


def test_objects_masks_with_foreground_values(tmp_path):
    """A mask file per object that marks its object with 128 (and a border with 40): not binary,
    refused alone; --foreground_values 128 picks the object in every file."""
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "s" / "images" / "s.png"), np.full((30, 40, 3), 90, np.uint8))
    for k, (y, x) in enumerate([(2, 2), (12, 20)]):
        mask = np.zeros((30, 40), np.uint8)
        mask[y - 1:y + 7, x - 1:x + 7] = 40
        mask[y:y + 6, x:x + 6] = 128
        cv2.imwrite(str(tmp_path / "s" / "masks" / f"{k}.png"), mask)
    with pytest.raises(DataError, match="not binary"):
        load_records(tmp_path, "objects")
    (record,) = load_records(tmp_path, "objects", DataOptions("objects", foreground_values=(128,)))
    masks = record.load_masks()
    assert masks.shape == (2, 30, 40) and masks.sum((1, 2)).tolist() == [36, 36]
    assert masks[1, 12:18, 20:26].all()


# ----------------------------------------------------------------------------- labelme


def test_labelme_nuts_with_embedded_images_only(tmp_path):
    nuts = require_shared_data("labelme-nuts")
    for path in (nuts / "images").glob("*.json"):
        shutil.copy(path, tmp_path / path.name)  # the JSONs alone: images come from imageData
    loaded = load_split("auto", str(tmp_path), DataOptions())
    assert loaded.fmt == "labelme" and loaded.problems == [] and len(loaded.records) == 18
    assert sum(r.num_objects for r in loaded.records) == 165
    record = next(r for r in loaded.records if Path(r.source).name == "0.json")
    assert record.embedded and record.image == record.source
    assert record.categories == ("date",) * 5 + ("fig",) * 4 + ("hazelnut",) * 3
    # labelme re-encodes the embedded copy: the same photo up to JPEG noise.
    diff = np.abs(record.load_image().astype(int) - load_image(nuts / "images" / "0.jpg").astype(int))
    assert record.size == (600, 800) and diff.mean() < 4
    shape = json.loads((tmp_path / "0.json").read_text())["shapes"][0]
    mask = record.load_masks([0])[0]
    expected = np.zeros((600, 800), np.uint8)
    cv2.fillPoly(expected, [np.round(np.array(shape["points"])).astype(np.int32)], 1)
    iou = (mask & expected).sum() / (mask | expected).sum()
    assert iou > 0.97
    x0, y0, x1, y1 = mask_to_box(mask)
    xs, ys = np.array(shape["points"]).T
    assert abs(x0 - xs.min()) <= 1.5 and abs(y1 - ys.max()) <= 1.5
    only = load_records(tmp_path, "labelme", DataOptions("labelme", labels=("fig",)), skip_bad=True)
    assert {c for r in only for c in r.categories} == {"fig"} and sum(r.num_objects for r in only) == 41


def write_labelme(path: Path, shapes: list, image_hw=(40, 60), embed=False, image_path="pic.png") -> Path:
    image = np.random.default_rng(0).integers(0, 255, (*image_hw, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", image)
    if not embed:
        (path.parent / image_path).write_bytes(png.tobytes())
    data = {"version": "5.2.1", "shapes": shapes, "imagePath": image_path,
            "imageData": base64.b64encode(png.tobytes()).decode() if embed else None,
            "imageHeight": image_hw[0], "imageWidth": image_hw[1]}
    path.write_text(json.dumps(data))
    return path


def shape(label, points, kind="polygon", group_id=None, **extra):
    return {"label": label, "points": points, "shape_type": kind, "group_id": group_id, "flags": {}, **extra}


def test_labelme_shape_types_groups_and_ignore(tmp_path):
    patch = np.zeros((5, 4), np.uint8)
    patch[1:4, 1:3] = 1
    buf = io.BytesIO()
    Image.fromarray(patch * 255).save(buf, format="PNG")
    shapes = [
        shape("cell", [[2, 2], [10, 2], [10, 8], [2, 8]]),  # polygon
        shape("cell", [[20, 5], [30, 12]], "rectangle"),
        shape("cell", [[45, 20], [45, 25]], "circle"),
        shape("leaf", [[2, 20], [8, 20], [5, 26]], group_id=1),
        shape("leaf", [[12, 20], [18, 20], [15, 26]], group_id=1),  # same object as the previous one
        shape("__ignore__blur", [[30, 30], [35, 30], [35, 35]]),
        shape("cell", [[0, 0], [5, 5]], "line"),
        shape("cell", [[50, 2], [53, 6]], "mask", mask=base64.b64encode(buf.getvalue()).decode()),
    ]
    path = write_labelme(tmp_path / "a.json", shapes)
    loaded = load_split("labelme", str(tmp_path), DataOptions())
    (record,) = loaded.records
    assert record.categories == ("cell", "cell", "cell", "leaf", "cell") and not record.embedded
    assert record.objects[3] == (3, 4)
    assert loaded.drops == {"__ignore__ label": 1, "line shape (no area)": 1}
    masks = record.load_masks()
    canvas = Image.new("L", (60, 40), 0)
    ImageDraw.Draw(canvas).rectangle([20, 5, 30, 12], outline=1, fill=1)
    np.testing.assert_array_equal(masks[1], np.array(canvas))
    assert masks[1].sum() == 11 * 8
    assert abs(int(masks[2].sum()) - np.pi * 25) < 20  # circle of radius 5
    np.testing.assert_array_equal(mask_to_box(masks[3]), [2, 20, 19, 27])  # the two triangles, one box
    np.testing.assert_array_equal(masks[4][2:6, 50:54], patch[:4])  # the mask shape placed at its corner
    assert masks[4].sum() == patch.sum()
    assert path.is_file()


# ----------------------------------------------------------------------------- coco


def tinycoco(split="train"):
    root = require_shared_data("tinycoco")
    return root / "annotations" / f"instances_{split}2017.json", root / "images" / f"{split}2017"


def test_tinycoco_objects_crowd_and_empty_images():
    from pycocotools.coco import COCO

    ann, images = tinycoco()
    loaded = load_split("coco", str(ann), DataOptions(), str(images))
    assert len(loaded.records) == 30 and loaded.total == 32
    assert sorted(p.kind for p in loaded.problems) == ["no objects", "no objects"]
    assert {n for n in TINYCOCO_EMPTY if any(n in str(p) for p in loaded.problems)} == TINYCOCO_EMPTY
    ids = {a for r in loaded.records for a in r.annotation_ids}
    assert len(ids) == 288 - 4 and not ids & TINYCOCO_CROWD
    assert loaded.drops == {"crowd region (iscrowd)": 4}
    coco = COCO(str(ann))
    record = max(loaded.records, key=lambda r: r.num_objects)
    masks = record.load_masks()
    for k, ann_id in enumerate(record.annotation_ids):
        np.testing.assert_array_equal(masks[k], coco.annToMask(coco.anns[ann_id]))
        assert record.categories[k] == coco.cats[coco.anns[ann_id]["category_id"]]["name"]


def test_coco_uncompressed_and_compressed_rle_and_categories(tmp_path):
    from pycocotools import mask as mask_utils

    h, w = 20, 30
    a = np.zeros((h, w), np.uint8, order="F")
    a[3:9, 4:12] = 1
    b = np.zeros((h, w), np.uint8, order="F")
    b[10:18, 15:28] = 1
    compressed = mask_utils.encode(b)
    compressed["counts"] = compressed["counts"].decode()
    flat = a.flatten(order="F")  # uncompressed RLE: run lengths, column-major, starting with zeros
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((h, w, 3), np.uint8))
    data = {"images": [{"id": 1, "file_name": "x.png", "height": h, "width": w}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": runs}},
                {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": compressed},
                {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    (record,) = load_records(tmp_path / "ann.json", "coco", images=str(tmp_path))
    masks = record.load_masks()
    np.testing.assert_array_equal(masks[0], a)
    np.testing.assert_array_equal(masks[1], b)
    assert record.categories == ("cat", "dog", "dog")
    (dogs,) = load_records(tmp_path / "ann.json", "coco", DataOptions("coco", categories=("dog",)), str(tmp_path))
    assert dogs.annotation_ids == (11, 12)
    with pytest.raises(DataError, match="--categories bird: not in"):
        load_records(tmp_path / "ann.json", "coco", DataOptions("coco", categories=("bird",)), str(tmp_path))
