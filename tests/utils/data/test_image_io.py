"""Strict image reading: truncation, EXIF, alpha, grey, high bit depth, palettes, odd file names."""

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from segment_anything.utils.data import BadSample, load_image, load_mask, load_records
from segment_anything.utils.data.image_io import apply_orientation, exif_orientation, read_label


def photo(h=48, w=64) -> np.ndarray:
    """RGB uint8 with structure (a JPEG of noise would be all noise)."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)


def test_truncated_jpeg_is_unreadable(tmp_path):
    path = tmp_path / "half.jpg"
    ok, data = cv2.imencode(".jpg", photo(200, 300))
    path.write_bytes(data.tobytes()[: len(data) // 2])
    assert cv2.imread(str(path)) is not None  # OpenCV alone would train on a grey bottom half
    with pytest.raises(BadSample, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.kind == "unreadable"
    complete = tmp_path / "ok.jpg"
    complete.write_bytes(data.tobytes() + b"\x00\x00")  # padding after the end marker is fine
    assert load_image(complete).shape == (200, 300, 3)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadSample, match="0 bytes") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow(tmp_path, orientation, suffix):
    image = Image.fromarray(photo())
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{suffix}"
    image.save(path, exif=exif.tobytes(), quality=95)
    assert exif_orientation(path.read_bytes()) == orientation
    expected = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    ours = load_image(path)
    assert ours.shape == expected.shape
    assert np.abs(ours.astype(int) - expected).mean() < 1.5  # decoders may differ by rounding
    np.testing.assert_array_equal(apply_orientation(np.array(Image.open(path)), orientation).shape, ours.shape)


def test_a_png_exif_chunk_after_the_pixels_is_found(tmp_path):
    """PNG allows eXIf after IDAT; a damaged chunk list leaves the decision to Pillow."""
    import struct
    import zlib

    Image.fromarray(photo()).save(tmp_path / "plain.png")
    data = (tmp_path / "plain.png").read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()[6:]  # without the "Exif\0\0" header, as PNG stores it
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    iend = data.rindex(b"IEND") - 4
    late = data[:iend] + chunk + data[iend:]
    assert exif_orientation(late) == 6
    assert exif_orientation(data[:40]) == 1  # truncated: Pillow cannot read it, so no orientation


def test_a_png_without_exif_is_read_as_stored(tmp_path):
    pixels = photo()
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    assert exif_orientation((tmp_path / "plain.png").read_bytes()) == 1
    np.testing.assert_array_equal(load_image(tmp_path / "plain.png"), pixels)


def test_rgba_grey_upper_case_and_non_ascii(tmp_path):
    rgb = photo()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "ÄÖ ñame.PNG")
    np.testing.assert_array_equal(load_image(tmp_path / "ÄÖ ñame.PNG"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.TIF")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.TIF"), np.repeat(rgb[..., :1], 3, 2))


def test_sixteen_bit_scaled_by_range(tmp_path):
    twelve = (np.arange(48 * 64).reshape(48, 64) % 4096).astype(np.uint16)
    twelve[0, 0], twelve[0, 1] = 100, 4000  # range 100..4000 is set by these two
    twelve = np.clip(twelve, 100, 4000)
    cv2.imwrite(str(tmp_path / "cells.png"), twelve)
    out = load_image(tmp_path / "cells.png")
    expected = np.round((twelve.astype(np.float32) - 100) * (255 / 3900)).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.max() == 255 and out.min() == 0  # not almost black, as a plain 8-bit conversion gives
    fixed = load_image(tmp_path / "cells.png", (0, 4095))
    np.testing.assert_array_equal(fixed[..., 0], np.round(twelve * (255 / 4095)).astype(np.uint8))


def test_palette_masks_are_indices_and_65535_is_binary(tmp_path):
    idx = np.zeros((10, 12), np.uint8)
    idx[2:5, 2:5], idx[6:9, 6:9] = 1, 2
    pal = Image.fromarray(idx, "P")
    pal.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), idx)
    with pytest.raises(BadSample, match="not binary") as info:
        load_mask(tmp_path / "p.png")
    assert "1, 2" in str(info.value) and "200" not in str(info.value)  # indices, not colours
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png", foreground_values=[2]), idx == 2)
    cv2.imwrite(str(tmp_path / "deep.png"), (idx > 0).astype(np.uint16) * 65535)
    np.testing.assert_array_equal(load_mask(tmp_path / "deep.png"), idx > 0)


def test_nested_folders_and_aliases(tmp_path):
    for sub in ("a", "b/c"):
        (tmp_path / "img" / sub).mkdir(parents=True)
        (tmp_path / "gt" / sub).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "img" / sub / "1.JPG"), photo(20, 30))
        mask = np.zeros((20, 30), np.uint8)
        mask[5:10, 5:10] = 255
        cv2.imwrite(str(tmp_path / "gt" / sub / "1.png"), mask)
    records = load_records(tmp_path)
    assert [r.image for r in records] == [str(tmp_path / "img" / "a" / "1.JPG"), str(tmp_path / "img" / "b/c" / "1.JPG")]
    assert [r.source for r in records] == [str(tmp_path / "gt" / "a" / "1.png"), str(tmp_path / "gt" / "b/c" / "1.png")]
