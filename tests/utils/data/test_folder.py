"""The folder format: pairing, strict mask loading, connected components, boxes, the dataset."""

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import require_shared_data
from segment_anything.utils.data import make_synthetic_dataset
from segment_anything.utils.data import (
    DataError, DataOptions, MaskDataset, collate, load_image, load_mask, load_records, mask_to_box, split_records,
)
from segment_anything.utils.data.formats.folder import Pair, find_pairs
from segment_anything.utils.data.prepare import load_split

from segment_anything.utils.transforms import ResizeLongestSide



def square_mask(h=40, w=50, box=(10, 5, 30, 25)) -> np.ndarray:
    """uint8 (h, w) with ones in columns box[0]:box[2], rows box[1]:box[3]."""
    mask = np.zeros((h, w), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 1
    return mask


def write_pair(root: Path, stem: str, mask: np.ndarray, dirs=("images", "labels"),
               image_ext=".png", mask_ext=".png", image_hw=None) -> Pair:
    """Write a random RGB image and mask*255 under root/dirs; returns the Pair."""
    h, w = image_hw or mask.shape
    (root / dirs[0]).mkdir(parents=True, exist_ok=True)
    (root / dirs[1]).mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(len(stem)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pair = Pair(root / dirs[0] / f"{stem}{image_ext}", root / dirs[1] / f"{stem}{mask_ext}")
    assert cv2.imwrite(str(pair.image), image) and cv2.imwrite(str(pair.mask), mask * 255)
    return pair


@pytest.mark.parametrize("dirs", [("images", "labels"), ("image", "mask")])
def test_find_pairs_matches_by_stem_not_order(tmp_path, dirs):
    stems = [f"s{k}" for k in range(8)]
    image_exts = [".png", ".jpg", ".JPEG", ".bmp", ".tif", ".TIFF", ".png", ".jpg"]
    shuffled = stems[:]
    random.Random(3).shuffle(shuffled)  # create files in an order unrelated to the names
    for stem in shuffled:
        k = int(stem[1:])
        write_pair(tmp_path, stem, square_mask(), dirs, image_exts[k], ".png")
    (tmp_path / dirs[0] / "notes.txt").write_text("ignored")
    pairs, problems = find_pairs(tmp_path)
    assert problems == []
    assert [p.image.stem for p in pairs] == sorted(stems)
    assert all(p.image.stem == p.mask.stem for p in pairs)
    assert all(p.image.parent.name == dirs[0] and p.mask.parent.name == dirs[1] for p in pairs)
    assert pairs == sorted(pairs)


@pytest.mark.parametrize("missing", ["image", "mask"])
def test_find_pairs_missing_partner_names_file(tmp_path, missing):
    write_pair(tmp_path, "a", square_mask())
    lonely = write_pair(tmp_path, "b", square_mask())
    getattr(lonely, "mask" if missing == "mask" else "image").unlink()
    expected = lonely.image if missing == "mask" else lonely.mask
    pairs, problems = find_pairs(tmp_path)
    assert [p.image.stem for p in pairs] == ["a"]
    (problem,) = problems
    assert problem.kind == "unpaired" and f"{missing == 'mask' and 'image' or 'mask'} without a partner: {expected}" in str(problem)
    with pytest.raises(DataError, match="without a partner") as info:
        load_records(tmp_path)
    assert str(expected) in str(info.value)


def test_find_pairs_unknown_layout_and_empty(tmp_path):
    (tmp_path / "pics").mkdir()
    with pytest.raises(DataError, match="images/ \\+ .*labels/") as info:
        find_pairs(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match="no image or mask files"):
        find_pairs(tmp_path)


def test_find_pairs_duplicate_stem(tmp_path):
    pair = write_pair(tmp_path, "a", square_mask())
    cv2.imwrite(str(pair.image.with_suffix(".jpg")), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="same name") as info:
        find_pairs(tmp_path)
    assert "a.jpg" in str(info.value) and "a.png" in str(info.value)


@pytest.mark.parametrize("scale", [1, 255])
def test_load_mask_accepts_binary(tmp_path, scale):
    mask = square_mask()
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), mask * scale)
    out = load_mask(path)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    np.testing.assert_array_equal(out, mask)


def test_load_mask_rgb_and_16bit(tmp_path):
    mask = square_mask()
    cv2.imwrite(str(tmp_path / "rgb.png"), np.repeat(mask[..., None] * 255, 3, 2))
    cv2.imwrite(str(tmp_path / "deep.png"), mask.astype(np.uint16))
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png"), mask)
    np.testing.assert_array_equal(load_mask(tmp_path / "deep.png"), mask)


def test_load_mask_rejects_non_binary(tmp_path):
    mask = square_mask() * 255
    mask[0, :3] = (7, 128, 200)
    path = tmp_path / "labels.png"
    cv2.imwrite(str(path), mask)
    with pytest.raises(DataError, match="not binary") as info:
        load_mask(path)
    message = str(info.value)
    assert str(path) in message and "7" in message and "128" in message


def test_load_unreadable_names_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    for load in (load_mask, load_image):
        with pytest.raises(DataError, match="cannot read") as info:
            load(path)
        assert str(path) in str(info.value)


def test_load_mask_jpeg_is_thresholded(tmp_path):
    yy, xx = np.mgrid[:120, :160]
    mask = (((yy - 60) / 40.0) ** 2 + ((xx - 80) / 55.0) ** 2 <= 1).astype(np.uint8)
    path = tmp_path / "m.jpg"
    cv2.imwrite(str(path), mask * 255, [cv2.IMWRITE_JPEG_QUALITY, 75])
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(raw)) > 2  # the test is moot unless JPEG really added noise
    out = load_mask(path)
    assert set(np.unique(out).tolist()) == {0, 1}
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    assert (out != mask).sum() <= 10 and not ((out != mask) & (edge == 0)).any()


def test_load_image_is_rgb(tmp_path):
    bgr = np.zeros((6, 8, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in cv2's BGR order
    cv2.imwrite(str(tmp_path / "b.png"), bgr)
    image = load_image(tmp_path / "b.png")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 0, 255]


def test_mask_to_box_hand_computed():
    mask = np.zeros((20, 30), np.uint8)
    mask[4:9, 3:7] = 1  # rows 4..8, columns 3..6
    mask[12, 20] = 1  # a second blob: one box covers both
    box = mask_to_box(mask)
    assert box.dtype == np.float32 and box.shape == (4,)
    np.testing.assert_array_equal(box, [3, 4, 21, 13])
    with pytest.raises(DataError, match="no foreground"):
        mask_to_box(np.zeros((5, 5), np.uint8))


def test_empty_mask_is_a_sample_without_objects(tmp_path):
    write_pair(tmp_path, "full", square_mask())
    empty = write_pair(tmp_path, "empty", np.zeros((40, 50), np.uint8))
    loaded = load_split("folder", str(tmp_path), DataOptions())
    assert [Path(r.image).stem for r in loaded.records] == ["full"]
    (problem,) = loaded.problems
    assert problem.kind == "no objects" and str(empty.mask) in str(problem)
    assert [Path(r.image).stem for r in load_records(tmp_path, skip_bad=True)] == ["full"]


def test_all_masks_empty_is_an_error_even_with_skip_bad(tmp_path):
    write_pair(tmp_path, "empty", np.zeros((40, 50), np.uint8))
    with pytest.raises(DataError, match="no usable images"):
        load_records(tmp_path, skip_bad=True)


def test_size_mismatch_names_both(tmp_path):
    write_pair(tmp_path, "ok", square_mask())
    bad = write_pair(tmp_path, "bad", square_mask(), image_hw=(41, 50))
    with pytest.raises(DataError, match="size mismatch") as info:
        load_records(tmp_path)
    message = str(info.value)
    assert str(bad.image) in message and str(bad.mask) in message
    assert "50x41" in message and "50x40" in message


def test_every_bad_file_is_reported_at_once(tmp_path):
    for stem in ("a", "b", "c"):
        write_pair(tmp_path, stem, square_mask())
    for stem in ("a", "c"):
        cv2.imwrite(str(tmp_path / "labels" / f"{stem}.png"), square_mask() * 100)
    with pytest.raises(DataError, match="2 bad sample") as info:
        load_records(tmp_path)
    assert "a.png" in str(info.value) and "c.png" in str(info.value)


def test_connected_components_are_objects(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[2:10, 3:12] = 1  # 72 px
    mask[20:30, 30:50] = 1  # 200 px
    mask[35, 55] = 1  # 1 px speck
    mask[10:12, 12:14] = 1  # touches the first blob diagonally (8-connectivity): same object
    write_pair(tmp_path, "a", mask)
    (record,) = load_records(tmp_path)
    masks = record.load_masks()
    assert record.num_objects == 3 and masks.shape == (3, 40, 60)
    assert sorted(masks.sum((1, 2)).tolist()) == [1, 76, 200]
    np.testing.assert_array_equal(masks.max(0), mask)
    np.testing.assert_array_equal(record.load_masks([2, 0]), masks[[2, 0]])
    big = load_split("folder", str(tmp_path), DataOptions(min_area=50))
    assert big.records[0].num_objects == 2 and big.drops == {"smaller than --min_area": 1}
    (whole,) = load_records(tmp_path, opts=DataOptions(instance_mode="per_image"))
    assert whole.num_objects == 1
    np.testing.assert_array_equal(whole.load_masks()[0], mask)


def test_split_records_deterministic_disjoint():
    from segment_anything.utils.data import Record

    pairs = [Record(f"i/{k:02d}.png", (4, 4), f"m/{k:02d}.png", ("object",)) for k in range(20)]
    train, val = split_records(pairs, 0.2, seed=21)
    assert (len(train), len(val)) == (16, 4)
    assert not set(train) & set(val) and sorted(train + val, key=lambda r: r.image) == pairs
    assert split_records(list(reversed(pairs)), 0.2, seed=21) == (train, val)
    assert split_records(pairs, 0.2, seed=22) != (train, val)
    assert tuple(map(len, split_records(pairs[:2], 0.01))) == (1, 1)
    assert tuple(map(len, split_records(pairs[:2], 0.99))) == (1, 1)
    with pytest.raises(DataError, match="at least 2"):
        split_records(pairs[:1])


def test_longest_side_size():
    size = ResizeLongestSide.get_preprocess_shape
    assert size(300, 200, 256) == (256, 171)
    assert size(200, 300, 256) == (171, 256)
    assert size(1079, 607, 1024) == (1024, 576)
    assert size(100, 100, 64) == (64, 64)


def test_mask_dataset_item(tmp_path):
    mask = square_mask(300, 200, box=(20, 30, 120, 250))
    write_pair(tmp_path, "a", mask)
    item = MaskDataset(load_records(tmp_path), image_size=256)[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 256, 171)
    assert item["original_size"] == (300, 200) and item["input_size"] == (256, 171)
    assert item["masks"].dtype == torch.uint8 and item["masks"].shape == (1, 300, 200)
    np.testing.assert_array_equal(item["masks"][0].numpy(), mask)
    assert item["boxes"].dtype == torch.float32 and item["boxes"].shape == (1, 4)
    assert item["boxes"].tolist() == [[20, 30, 120, 250]]
    assert item["path"] == str(tmp_path / "images" / "a.png")
    batch = collate([item, item])
    assert isinstance(batch, list) and len(batch) == 2 and batch[0] is item


def test_mask_dataset_resize_matches_sam_predictor(tmp_path):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    write_pair(tmp_path, "a", square_mask(300, 200))
    records = load_records(tmp_path)
    item = MaskDataset(records, image_size=256)[0]
    # What SAM's ResizeLongestSide.apply_image does to a numpy image.
    expected = np.array(tvf.resize(tvf.to_pil_image(load_image(records[0].image)), [256, 171]))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("mode", ["per_object", "per_image"])
def test_nails_dataset(mode):
    nails = require_shared_data("nails")
    pairs, problems = find_pairs(nails)
    assert len(pairs) == 52 and problems == []
    loaded = load_split("auto", str(nails), DataOptions(instance_mode=mode))
    assert loaded.fmt == "folder" and loaded.problems == [] and len(loaded.records) == 52
    counts = [r.num_objects for r in loaded.records]
    # Hand-checked: 290 nail components (3 to 10 per hand); per_image: one mask per hand.
    assert (sum(counts), min(counts), max(counts)) == ((290, 3, 10) if mode == "per_object" else (52, 1, 1))
    dataset = MaskDataset(loaded.records[:6], image_size=64)
    for k in range(len(dataset)):
        item = dataset[k]
        h, w = item["original_size"]
        mask = load_mask(loaded.records[k].source)
        np.testing.assert_array_equal(item["masks"].numpy().max(0), mask)  # the objects cover the mask exactly
        for m, (x0, y0, x1, y1) in zip(item["masks"].numpy(), item["boxes"].tolist()):
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert max(item["input_size"]) == 64


def test_synthetic_dataset_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n=6, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", n=6, seed=5)
    c = make_synthetic_dataset(tmp_path / "c", n=6, seed=6, layout="image")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 13  # 6 images, 6 masks, marker
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (c / "image").is_dir() and (c / "mask").is_dir()
    assert (a / "images" / "0000.png").read_bytes() != (c / "image" / "0000.png").read_bytes()
    valid, problems = find_pairs(a)
    assert problems == [] and len(load_records(a)) == 6
    for pair in valid:
        h, w = load_image(pair.image).shape[:2]
        assert 160 <= h <= 320 and 160 <= w <= 320
        assert set(np.unique(cv2.imread(str(pair.mask), cv2.IMREAD_GRAYSCALE))) == {0, 255}


def test_synthetic_dataset_object_is_distinct(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", n=8, seed=1)
    for pair in find_pairs(root)[0]:
        image, mask = load_image(pair.image).astype(float), load_mask(pair.mask).astype(bool)
        saturation = image.max(-1) - image.min(-1)
        assert saturation[mask].mean() > 100 > 3 * saturation[~mask].mean()
        assert 0.01 < mask.mean() < 0.5


def test_synthetic_dataset_protects_foreign_folders(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", n=3)
    stamp = (root / "images" / "0000.png").stat().st_mtime_ns
    assert make_synthetic_dataset(root, n=3) == root  # reused, not rewritten
    assert (root / "images" / "0000.png").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="different|made with"):
        make_synthetic_dataset(root, n=4)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not made by"):
        make_synthetic_dataset(foreign, n=3)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(find_pairs(make_synthetic_dataset(empty, n=2))[0]) == 2
