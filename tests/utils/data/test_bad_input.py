"""Every kind of bad input is found by prepare_data before training, named, and reported at once;
--skip_bad leaves the samples out and lists them."""

import base64
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import require_shared_data
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import DataError, prepare_data


def folder(tmp_path, name="train", n=3, seed=3) -> Path:
    """A small good folder dataset (a copy: the synthetic marker stays out of the way)."""
    src = make_synthetic_dataset(tmp_path / f".{name}", n=n, size_range=(40, 56), seed=seed)
    shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns(".synthetic"))
    return tmp_path / name


def fails(**flags) -> str:
    with pytest.raises(DataError) as info:
        prepare_data(TrainConfig(**flags).resolve().data)
    return str(info.value)


def skipped(**flags):
    data = prepare_data(TrainConfig(skip_bad=True, **flags).resolve().data)
    return data, "\n".join(data.skipped)


# ----------------------------------------------------------------------------- image files


def test_truncated_image(tmp_path):
    root = folder(tmp_path)
    bad = root / "images" / "0001.jpg"
    ok, data = cv2.imencode(".jpg", cv2.imread(str(root / "images" / "0001.png")))
    bad.write_bytes(data.tobytes()[: len(data) // 2])
    (root / "images" / "0001.png").unlink()
    text = fails(train_dir=str(root))
    assert f"{bad}: truncated or corrupt JPEG" in text and "--skip_bad" in text
    data, listed = skipped(train_dir=str(root))
    assert str(bad) in listed and data.skip_summary == "skipped 1 of 3 images: 1 unreadable"
    assert len(data.train) + len(data.val) == 2


def test_zero_byte_image(tmp_path):
    root = folder(tmp_path)
    bad = root / "labels" / "0002.png"
    bad.write_bytes(b"")
    assert f"{bad}: file is empty (0 bytes)" in fails(train_dir=str(root))


def test_size_mismatch_with_exif_hint(tmp_path):
    from PIL import Image

    root = folder(tmp_path)
    bad = root / "labels" / "0000.png"
    cv2.imwrite(str(bad), cv2.imread(str(bad), cv2.IMREAD_GRAYSCALE).T.copy())
    text = fails(train_dir=str(root))
    assert "size mismatch" in text and str(bad) in text and "transposed" in text and "EXIF" not in text
    # A photo stored landscape with EXIF "rotate 90" and a mask drawn on the stored pixels.
    photo = root / "images" / "0001.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(photo).convert("RGB").save(root / "images" / "0001.jpg", exif=exif.tobytes())
    photo.unlink()
    text = fails(train_dir=str(root))
    assert str(root / "images" / "0001.jpg") in text and "EXIF orientation rotates it by 90 degrees" in text


def test_non_binary_mask(tmp_path):
    root = folder(tmp_path)
    bad = root / "labels" / "0001.png"
    mask = cv2.imread(str(bad), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(bad), np.where(mask > 0, 3, 0).astype(np.uint8) + (mask[::-1] > 0))
    text = fails(train_dir=str(root))
    assert f"{bad}: mask is not binary" in text and "--foreground_values" in text


@pytest.mark.parametrize("remove", ["images", "labels"])
def test_file_without_partner(tmp_path, remove):
    root = folder(tmp_path)
    (root / remove / "0002.png").unlink()
    other = "labels" if remove == "images" else "images"
    what = "mask" if remove == "images" else "image"
    assert f"{what} without a partner: {root / other / '0002.png'}" in fails(train_dir=str(root))


def test_no_objects_after_min_area(tmp_path):
    root = folder(tmp_path)
    text = fails(train_dir=str(root), min_area=10**6)
    assert "no objects left" in text and str(root / "images" / "0000.png") in text and "smaller than --min_area" in text


def test_empty_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    assert "no image or mask files" in fails(train_dir=str(tmp_path))
    root = folder(tmp_path, "all_bad", n=2)
    for mask in (root / "labels").iterdir():
        mask.write_bytes(b"")
    assert "no usable images (2 listed, 2 bad)" in fails(train_dir=str(root), skip_bad=True)


def test_every_problem_at_once_across_train_and_val(tmp_path):
    train, val = folder(tmp_path, "train"), folder(tmp_path, "val", n=2, seed=4)
    (train / "labels" / "0000.png").write_bytes(b"")
    (val / "images" / "0001.png").write_bytes(b"garbage")
    text = fails(train_dir=str(train), val_dir=str(val))
    assert "2 bad sample(s)" in text and str(train / "labels" / "0000.png") in text and str(val / "images" / "0001.png") in text


# ----------------------------------------------------------------------------- train / val overlap


def test_val_dir_is_train_dir(tmp_path):
    root = folder(tmp_path)
    assert "--val_dir" in fails(train_dir=str(root), val_dir=str(root) + "/")


def test_shared_files_refused_and_identical_content_warned(tmp_path):
    train, val = folder(tmp_path, "train"), folder(tmp_path, "val", n=2, seed=4)
    (val / "images" / "0000.png").unlink()
    (val / "images" / "0000.png").symlink_to(train / "images" / "0000.png")
    (val / "labels" / "0000.png").unlink()
    shutil.copy(train / "labels" / "0000.png", val / "labels" / "0000.png")
    assert "in both the training and the validation data" in fails(train_dir=str(train), val_dir=str(val))
    (val / "images" / "0000.png").unlink()
    ok, png = cv2.imencode(".png", cv2.imread(str(train / "images" / "0000.png")), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    (val / "images" / "0000.png").write_bytes(png.tobytes())  # other bytes, same pixels
    notes = "\n".join(prepare_data(TrainConfig(train_dir=str(train), val_dir=str(val)).resolve().data).notes)
    assert f"identical image content in train and val: {train / 'images' / '0000.png'} and {val / 'images' / '0000.png'}" in notes


def test_identical_content_warnings_are_capped(tmp_path):
    """Many duplicates across the splits: the first few are named, the rest counted in one line."""
    train, val = folder(tmp_path, "train", n=8), tmp_path / "val"
    shutil.copytree(train, val)  # other files, the same pixels: every validation image warned about
    notes = prepare_data(TrainConfig(train_dir=str(train), val_dir=str(val)).resolve().data).notes
    named = [n for n in notes if "identical image content" in n]
    assert len(named) == 5 and named[0].endswith(f"{train / 'images' / '0000.png'} and {val / 'images' / '0000.png'}")
    assert "warning: 3 more validation images have the content of a training image (8 in all)" in notes


def test_nails_duplicate_pair_is_named_when_split_apart():
    """nails holds one photo twice (different bytes, same pixels); the default seeded split puts
    one copy in train and the other in val."""
    nails = require_shared_data("nails")
    data = prepare_data(TrainConfig(train_dir=str(nails), min_area=10).resolve().data)
    a, b = "2C29D473-CCB4-458C-926B-99D0042161E6.jpg", "d61a32a0-db67-11e8-9658-0242ac1c0002.jpg"
    sides = {Path(r.image).name: side for side, recs in (("train", data.train), ("val", data.val)) for r in recs}
    assert {sides[a], sides[b]} == {"train", "val"}
    notes = "\n".join(data.notes)
    (line,) = [n for n in notes.splitlines() if "identical image content" in n]
    assert a in line and b in line
    assert "289 objects" in notes and "dropped objects: 1 smaller than --min_area" in notes  # a 1-pixel speck


# ----------------------------------------------------------------------------- labelme


def labelme_dir(tmp_path, shapes=None, embed=True, image_path="pic.png", text=None) -> Path:
    root = tmp_path / "lm"
    root.mkdir(exist_ok=True)
    ok, png = cv2.imencode(".png", np.full((30, 40, 3), 120, np.uint8))
    good = {"shapes": [{"label": "a", "points": [[2, 2], [20, 2], [20, 20]], "shape_type": "polygon"}],
            "imagePath": "missing.png", "imageData": base64.b64encode(png.tobytes()).decode(),
            "imageHeight": 30, "imageWidth": 40}
    (root / "good.json").write_text(json.dumps(good))
    (root / "good2.json").write_text(json.dumps(good))
    bad = dict(good, imagePath=image_path, imageData=good["imageData"] if embed else None)
    if shapes is not None:
        bad["shapes"] = shapes
    (root / "bad.json").write_text(text if text is not None else json.dumps(bad))
    return root


def test_labelme_json_does_not_parse(tmp_path):
    root = labelme_dir(tmp_path, text='{"shapes": [')
    assert f"{root / 'bad.json'}: not valid JSON" in fails(train_dir=str(root), data_format="labelme")


def test_labelme_polygon_with_two_points(tmp_path):
    root = labelme_dir(tmp_path, shapes=[{"label": "a", "points": [[1, 1], [5, 5]], "shape_type": "polygon"}])
    text = fails(train_dir=str(root))
    assert f"{root / 'bad.json'}: shape 0 ('a') is a polygon with 2 point(s)" in text


def test_labelme_shape_outside_the_image(tmp_path):
    root = labelme_dir(tmp_path, shapes=[{"label": "a", "points": [[50, 1], [60, 1], [55, 9]], "shape_type": "polygon"}])
    assert f"{root / 'bad.json'}: shape 0 ('a') lies entirely outside the 40x30 image" in fails(train_dir=str(root))


def test_labelme_image_missing_without_image_data(tmp_path):
    root = labelme_dir(tmp_path, embed=False, image_path="gone.jpg")
    text = fails(train_dir=str(root))
    assert f"{root / 'bad.json'}: imagePath 'gone.jpg' does not exist" in text and "no imageData" in text
    data, listed = skipped(train_dir=str(root), val_dir=None)
    assert "bad.json" in listed and data.skip_summary == "skipped 1 of 3 images: 1 missing image"


# ----------------------------------------------------------------------------- coco


def coco_dir(tmp_path, images=2, annotations=None) -> tuple:
    (tmp_path / "imgs").mkdir()
    for k in range(images):
        cv2.imwrite(str(tmp_path / "imgs" / f"{k}.png"), np.full((20, 30, 3), 50 * k, np.uint8))
    poly = [[2, 2, 12, 2, 12, 12, 2, 12]]
    data = {"images": [{"id": k, "file_name": f"{k}.png", "height": 20, "width": 30} for k in range(3)],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": annotations or [{"id": 100 + k, "image_id": k, "category_id": 1, "iscrowd": 0,
                                            "segmentation": poly} for k in range(3)]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return str(tmp_path / "ann.json"), str(tmp_path / "imgs")


def test_coco_image_file_missing(tmp_path):
    ann, imgs = coco_dir(tmp_path, images=2)
    text = fails(train_json=ann, train_images=imgs)
    assert f"{Path(imgs) / '2.png'}: file does not exist (image id 2 in {ann})" in text


def test_coco_annotation_for_an_unknown_image(tmp_path):
    poly = [[2, 2, 12, 2, 12, 12]]
    anns = [{"id": 7, "image_id": k, "category_id": 1, "iscrowd": 0, "segmentation": poly} for k in (0, 1, 2, 99)]
    ann, imgs = coco_dir(tmp_path, images=3, annotations=anns)
    text = fails(train_json=ann, train_images=imgs)
    assert f"{ann}: annotation 7 refers to image id 99, which is not in 'images'" in text


def test_coco_image_without_annotations(tmp_path):
    poly = [[2, 2, 12, 2, 12, 12]]
    anns = [{"id": 7, "image_id": k, "category_id": 1, "iscrowd": 0, "segmentation": poly} for k in (0, 1)]
    ann, imgs = coco_dir(tmp_path, images=3, annotations=anns)
    assert f"{Path(imgs) / '2.png'} ({ann}): no objects left (none annotated)" in fails(train_json=ann, train_images=imgs)


def test_malformed_labelme_points_are_a_named_problem(tmp_path):
    root = labelme_dir(tmp_path, shapes=[{"label": "a", "points": [["x", 1], [5, 5], [3, 9]], "shape_type": "polygon"}])
    text = fails(train_dir=str(root))
    assert f"{root / 'bad.json'}: cannot use it (ValueError" in text


def test_labelme_image_path_naming_the_json_reads_image_data(tmp_path):
    # labelme's own tutorial files: imagePath is the JSON itself, the picture is in imageData;
    # labelme opens them from imageData, and so must the data check.
    root = labelme_dir(tmp_path, image_path="bad.json")
    data = prepare_data(TrainConfig(train_dir=str(root)).resolve().data)
    records = {Path(r.source).name: r for r in data.train + data.val}
    assert records["bad.json"].embedded and records["bad.json"].load_image().shape == (30, 40, 3)
    root = labelme_dir(tmp_path, image_path="bad.json", embed=False)
    assert f"{root / 'bad.json'}: imagePath 'bad.json' is this JSON file and there is no imageData" in fails(train_dir=str(root))


def test_labelme_image_path_not_an_image_falls_back_to_image_data(tmp_path):
    root = labelme_dir(tmp_path, image_path="notes.txt")
    (root / "notes.txt").write_text("not a picture")
    data = prepare_data(TrainConfig(train_dir=str(root)).resolve().data)
    assert {Path(r.source).name for r in data.train + data.val if r.embedded} == {"good.json", "good2.json", "bad.json"}


def test_coco_annotation_with_an_unknown_category_is_refused(tmp_path):
    poly = [[2, 2, 12, 2, 12, 12]]
    anns = [{"id": 40 + k, "image_id": k, "category_id": 99 if k == 1 else 1, "iscrowd": 0, "segmentation": poly}
            for k in range(3)]
    ann, imgs = coco_dir(tmp_path, images=3, annotations=anns)
    text = fails(train_json=ann, train_images=imgs)
    assert f"{ann}: annotation 41 of 1.png has category_id 99, which is not in 'categories' (ids: 1)" in text
    data, listed = skipped(train_json=ann, train_images=imgs)
    assert "annotation 41" in listed and len(data.train) + len(data.val) == 2


@pytest.mark.parametrize("given,layout", [("objects", "folder"), ("labelme", "folder"), ("folder", "objects"),
                                          ("instance_map", "objects")])
def test_explicit_format_on_another_layout_names_the_layout(tmp_path, given, layout):
    src = make_synthetic_dataset(tmp_path / ".src", n=3, size_range=(40, 56), seed=3, kind=layout)
    shutil.copytree(src, tmp_path / "set", ignore=shutil.ignore_patterns(".synthetic"))
    text = fails(train_dir=str(tmp_path / "set"), data_format=given)
    assert f"looks like the {layout} layout" in text and f"--data_format {layout}" in text, text
    assert "\n" not in text  # one line, not a list of every sub-folder as a bad sample


def test_malformed_coco_entries_are_named_problems_not_crashes(tmp_path):
    poly = [[2, 2, 12, 2, 12, 12]]
    anns = [{"id": 7, "image_id": k, "category_id": 1, "iscrowd": 0, "segmentation": poly} for k in (0, 1)] + ["x"]
    ann, imgs = coco_dir(tmp_path, images=3, annotations=anns)
    data = json.loads(Path(ann).read_text())
    del data["images"][2]["height"]
    data["images"].append({"id": "nine", "file_name": "9.png", "height": 20, "width": 30})
    Path(ann).write_text(json.dumps(data))
    text = fails(train_json=ann, train_images=imgs)
    assert f"{ann}: images[2] has no 'height' (a COCO image entry has id, file_name, height and width)" in text
    assert f"{ann}: images[3] id, height and width must be whole numbers" in text
    assert f"{ann}: annotations[2] is not an object" in text
    run, listed = skipped(train_json=ann, train_images=imgs)
    assert len(run.train) + len(run.val) == 2 and "images[3]" in listed
    data["categories"] = [{"name": "thing"}]
    Path(ann).write_text(json.dumps(data))
    assert fails(train_json=ann, train_images=imgs) == f"{ann}: 'categories' is not a list of {{\"id\": ..., \"name\": ...}} entries"
