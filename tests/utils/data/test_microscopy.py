"""Microscopy inputs: multi-channel, 16-bit and float TIFF, stacks, --channels, per-channel
--intensity_range and --plane, on small files generated here; expected pixels computed by hand."""

import cv2
import numpy as np
import pytest
import tifffile

from segment_anything.tools import predict, prepare
from segment_anything.tools._model import build_base
from segment_anything.training.config import TrainConfig
from segment_anything.utils.data import BadSample, DataOptions, load_image, load_records
from segment_anything.utils.data.image_io import load_image_planes, load_mask
from segment_anything.utils.image_spec import ImageSpec
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import save_partial_weight

H, W = 24, 32


def scaled(channel: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The 0..255 mapping written out: (v - lo) * 255 / (hi - lo), clipped, rounded."""
    return np.clip((channel.astype(np.float64) - lo) * 255.0 / (hi - lo), 0, 255).round().astype(np.uint8)


def own(channel: np.ndarray) -> np.ndarray:
    return scaled(channel, float(channel.min()), float(channel.max()))


@pytest.fixture
def four(tmp_path):
    """A 4-channel 16-bit image (CYX), each channel with its own brightness."""
    rng = np.random.default_rng(0)
    data = np.stack([rng.integers(lo, hi, (H, W)) for lo, hi in ((0, 4096), (200, 900), (1000, 60000), (5, 50))])
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, data.astype(np.uint16), photometric="minisblack", metadata={"axes": "CYX"})
    return path, data.astype(np.uint16)


def test_channels_pick_and_map_with_per_channel_auto_range(four):
    path, data = four
    out = load_image(path, ImageSpec(channels=(0, 2, 3)))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    for i, c in enumerate((0, 2, 3)):
        np.testing.assert_array_equal(out[..., i], own(data[c]))
    mapped = load_image(path, ImageSpec(channels=(1, 3, 3)))
    np.testing.assert_array_equal(mapped[..., 1], mapped[..., 2])
    np.testing.assert_array_equal(mapped[..., 0], own(data[1]))
    grey = load_image(path, ImageSpec(channels=(2,)))
    for i in range(3):
        np.testing.assert_array_equal(grey[..., i], own(data[2]))


def test_per_channel_intensity_ranges(four):
    path, data = four
    spec = ImageSpec.from_flags("0,1,2", "0,4095;auto;1000,30000")
    out = load_image(path, spec)
    np.testing.assert_array_equal(out[..., 0], scaled(data[0], 0, 4095))
    np.testing.assert_array_equal(out[..., 1], own(data[1]))
    np.testing.assert_array_equal(out[..., 2], scaled(data[2], 1000, 30000))
    same = load_image(path, ImageSpec.from_flags("3", "0,100"))  # one range for the one channel
    np.testing.assert_array_equal(same[..., 2], scaled(data[3], 0, 100))


def test_errors_name_the_file_and_what_was_expected(four):
    path, _ = four
    with pytest.raises(BadSample, match=rf"^{path}: 4 channels, --channels not given: pick three with --channels 0,1,2"):
        load_image(path)
    with pytest.raises(BadSample, match=rf"^{path}: --channels 0,5,1 asks for channel 5, the image has 4 \(0..3\)"):
        load_image(path, ImageSpec(channels=(0, 5, 1)))
    for channels, ranges, match in (("0,1", "auto", "--channels must be one channel index"),
                                    ("0,1,2", "0,10;auto", "--intensity_range gives 2 ranges"),
                                    ("", "5,1", "--intensity_range must be auto, LO,HI with HI > LO")):
        with pytest.raises(ValueError, match=match):
            ImageSpec.from_flags(channels, ranges)
        with pytest.raises(ValueError, match=match):
            TrainConfig(checkpoint="none", channels=channels, intensity_range=ranges)


def test_z_stack_planes_are_separate_images(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 65535, (3, 2, H, W)).astype(np.uint16)  # Z, C, Y, X
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(BadSample, match=rf"^{path}: 3 planes \(Z=3\), --plane not given: pick one with --plane N \(0..2\)"):
        load_image(path, ImageSpec(channels=(0, 1, 1)))
    with pytest.raises(BadSample, match=rf"^{path}: --plane 3 asked, the file has 3 plane\(s\)"):
        load_image(path, ImageSpec(channels=(0, 1, 1), plane=3))
    with pytest.raises(BadSample, match=rf"^{path} plane 2: 2 channels, --channels not given"):
        load_image(path, ImageSpec(plane=2))
    one = load_image(path, ImageSpec(channels=(0, 1, 1), plane=1))
    np.testing.assert_array_equal(one[..., 0], own(stack[1, 0]))
    np.testing.assert_array_equal(one[..., 2], own(stack[1, 1]))
    every = list(load_image_planes(path, ImageSpec(channels=(1,)), every=True))
    assert [(k, name) for k, name, _ in every] == [(k, f"{path} plane {k}") for k in range(3)]
    for k, (_, _, image) in enumerate(every):
        np.testing.assert_array_equal(image[..., 0], own(stack[k, 1]))


def test_time_series_planes_named_on_each_axis_and_float_data(tmp_path):
    rng = np.random.default_rng(2)
    series = rng.normal(0.5, 0.2, (2, 3, H, W)).astype(np.float32)  # T, Z, Y, X
    series[0, 0, 0, 0] = np.nan
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, series, photometric="minisblack", metadata={"axes": "TZYX"})
    with pytest.raises(BadSample, match=r"6 planes \(T=2, Z=3\)"):
        load_image(path)
    image = load_image(path, ImageSpec(plane=4))  # t=1, z=1
    np.testing.assert_array_equal(image[..., 1], own(series[1, 1]))
    with pytest.raises(BadSample, match=rf"^{path} plane 4 \(T=1, Z=1\): --channels 2 asks for channel 2, the image has 1"):
        load_image(path, ImageSpec(channels=(2,), plane=4))
    first = load_image(path, ImageSpec(plane=0))  # NaN: black; the finite pixels set the range
    lo, hi = float(np.nanmin(series[0, 0])), float(np.nanmax(series[0, 0]))
    np.testing.assert_array_equal(first[..., 0], scaled(np.nan_to_num(series[0, 0], nan=lo), lo, hi))


def test_unlabelled_pages_read_as_planes_or_as_channels(tmp_path):
    pages = np.stack([np.full((H, W), v, np.uint16) for v in (100, 200, 300)])
    pages[:, 0, 0] = 0
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, pages, photometric="minisblack")
    with pytest.raises(BadSample, match="3 planes \\(pages\\).*or --channels to read the pages as channels"):
        load_image(path)
    as_channels = load_image(path, ImageSpec(channels=(2, 1, 0), ranges=((0, 300),)))
    np.testing.assert_array_equal(as_channels[5, 5], scaled(np.array([300, 200, 100]), 0, 300))


def test_rgb_tiff_and_opencv_written_tiff_read_as_before(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.tif"), load_image(tmp_path / "rgb.png"))
    deep = rng.integers(100, 4000, (H, W)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "lzw.tif"), deep)  # LZW: tifffile needs imagecodecs, OpenCV reads it
    np.testing.assert_array_equal(load_image(tmp_path / "lzw.tif")[..., 0], own(deep))


def make_stack_data(root, with_label_stack: bool):
    """folder format: 2 images of Z=2 planes x 3 channels; plane z holds a square at offset z."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        stack = rng.integers(0, 3000, (2, 3, H, W)).astype(np.uint16)
        tifffile.imwrite(root / "images" / f"{name}.tif", stack, imagej=True, metadata={"axes": "ZCYX"})
        labels = np.zeros((2, H, W), np.uint8)
        labels[0, 2:8, 2:8] = 255
        labels[1, 10:20, 12:30] = 255
        tifffile.imwrite(root / "labels" / f"{name}.tif", labels if with_label_stack else labels[1])


@pytest.mark.parametrize("label_stack", [True, False])
def test_training_records_read_one_plane_of_image_and_label_stacks(tmp_path, label_stack):
    make_stack_data(tmp_path, label_stack)
    with pytest.raises(Exception, match=r"a.tif: 2 planes \(Z=2\), --plane not given"):
        load_records(tmp_path, "folder", DataOptions("folder"))
    opts = DataOptions("folder", image_spec=ImageSpec(plane=1))
    records = load_records(tmp_path, "folder", opts)
    assert [r.num_objects for r in records] == [1, 1]
    mask = records[0].load_masks()[0]
    assert mask[10:20, 12:30].all() and mask.sum() == 10 * 18
    image = records[0].load_image()
    stack = tifffile.imread(tmp_path / "images" / "a.tif")
    expected = load_image(tmp_path / "images" / "a.tif", ImageSpec(plane=1))
    np.testing.assert_array_equal(image, expected)
    lo, hi = float(stack[1].min()), float(stack[1].max())  # no --channels: one range over the three
    np.testing.assert_array_equal(image[..., 2], scaled(stack[1, 2], lo, hi))
    if label_stack:
        np.testing.assert_array_equal(load_mask(tmp_path / "labels" / "a.tif", plane=0)[2:8, 2:8], 1)


def test_prepare_tool_takes_the_flags(tmp_path, capsys):
    make_stack_data(tmp_path / "data", True)
    out = tmp_path / "out"
    prepare.main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(out), "--channels", "0,1,1",
                  "--intensity_range", "0,3000", "--plane", "0"])
    written = cv2.imread(str(out / "images" / "a.png"))[..., ::-1]
    stack = tifffile.imread(tmp_path / "data" / "images" / "a.tif")
    np.testing.assert_array_equal(written[..., 2], scaled(stack[0, 1], 0, 3000))
    with pytest.raises(SystemExit, match="--channels must be one channel index"):
        prepare.main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "o2"), "--channels", "x"])


def test_predict_reads_every_plane_of_a_stack_as_its_own_image(tmp_path):
    tuned = randomize_(build_base("vit_t", "none", 128), seed=4)
    weights = save_partial_weight(tuned, tmp_path / "best.pth", {"model_type": "vit_t", "image_size": 128},
                                  keys=["mask_decoder"])
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 4000, (2, 2, H, W)).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZCYX"})
    common = ["--model_type", "vit_t", "--checkpoint", "none", "--weights", str(weights), "--image", str(path),
              "--box", "2,2,20,16", "--channels", "0,1,1"]
    with pytest.raises(BadSample, match=rf"{path}: 2 planes \(Z=2\), --plane not given"):
        predict.main(common + ["--output", str(tmp_path / "none")])
    predict.main(common + ["--plane", "all", "--output", str(tmp_path / "all")])
    predict.main(common + ["--plane", "1", "--output", str(tmp_path / "one")])
    masks = [cv2.imread(str(tmp_path / "all" / f"stack_plane{k}_mask_0.png"), cv2.IMREAD_UNCHANGED) for k in range(2)]
    assert all(m is not None and m.shape == (H, W) for m in masks)
    single = cv2.imread(str(tmp_path / "one" / "stack_plane1_mask_0.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(masks[1], single)
