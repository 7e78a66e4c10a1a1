"""The NCut picture tool: block outputs from hooks, joint colouring, the PNG grid, bad input."""

import importlib.util
import sys

import cv2
import numpy as np
import pytest
import torch

from segment_anything.tools import ncut
from segment_anything.tools._model import build_base
from segment_anything.utils.block_features import block_outputs, encoder_blocks
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import save_partial_weight

pytestmark = pytest.mark.usefixtures("one_thread")
needs_ncut = pytest.mark.skipif(
    importlib.util.find_spec("ncut_pytorch") is None,
    reason="ncut-pytorch is not installed (pip install --no-deps -r requirements-ncut.txt; .ci/run does this)")


def photo(path, h=96, w=128):
    """A landscape picture with two objects on a gradient, written as PNG."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 2] = np.linspace(0, 200, w, dtype=np.uint8)[None]
    cv2.rectangle(image, (10, 10), (50, 60), (255, 255, 255), -1)
    cv2.circle(image, (95, 55), 20, (0, 200, 0), -1)
    cv2.imwrite(str(path), image)
    return path


def manual_block_outputs(encoder, x):
    """Every block's output by running the encoder's parts by hand, (B, H, W, C) each."""
    outs = []
    if hasattr(encoder, "blocks"):
        x = encoder.patch_embed(x) + encoder.pos_embed
        for blk in encoder.blocks:
            x = blk(x)
            outs.append(x)
        return outs
    x = encoder.patch_embed(x)
    for stage in encoder.layers:
        for blk in stage.blocks:
            x = blk(x)
            outs.append(x.permute(0, 2, 3, 1))
        if stage.downsample is not None:
            x = stage.downsample(x)
    return outs


@pytest.mark.parametrize("model_type", ["vit_t", "vit_b"])
def test_hooks_return_what_the_blocks_return(model_type):
    sam = build_base(model_type, "none", 128)
    randomize_(sam.image_encoder, seed=3)  # non-zero position tables: a skipped part would show
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        reference = manual_block_outputs(sam.image_encoder, x)
    indices = [1, 2, len(reference) - 1]
    got = block_outputs(sam.image_encoder, x, indices)
    assert sorted(got) == indices
    for i in indices:
        assert got[i].shape == reference[i].shape
        torch.testing.assert_close(got[i], reference[i], rtol=1e-5, atol=1e-5)
    assert not torch.equal(got[1], got[2])
    assert all(not blk._forward_hooks for blk in encoder_blocks(sam.image_encoder))
    # The forward stops after the deepest block asked for: the neck never runs.
    seen = []
    sam.image_encoder.neck.register_forward_hook(lambda *a: seen.append(1))
    block_outputs(sam.image_encoder, x, [0])
    assert not seen
    with pytest.raises(ValueError, match=r"out of range.*0\.\.%d" % (len(reference) - 1)):
        block_outputs(sam.image_encoder, x, [len(reference)])


@needs_ncut
def test_colours_are_computed_jointly_across_a_row():
    """Two grids of tokens from far-apart clusters: with one joint embedding they get different
    colours; grids embedded one by one would each be stretched over the whole colour range."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, 16, generator=gen) * 0.1
    b = torch.randn(10, 14, 16, generator=gen) * 0.1 + 3.0
    ca, cb = ncut.spectral_colours([a, b], n_eig=4, device="cpu")
    assert ca.shape == (12, 12, 3) and cb.shape == (10, 14, 3) and ca.dtype == np.uint8
    assert np.abs(ca.reshape(-1, 3).mean(0) - cb.reshape(-1, 3).mean(0)).max() > 100


@needs_ncut
def test_picture_grid_base_and_fine_tuned(tmp_path):
    image = photo(tmp_path / "photo.png")
    # A best.pth whose encoder differs from the base: the fine-tuned columns must change.
    sam = build_base("vit_t", "none", 128)
    randomize_(sam.image_encoder, seed=5)
    weights = save_partial_weight(sam, tmp_path / "best.pth", {"model_type": "vit_t", "image_size": 128},
                                  keys=["image_encoder"])
    cell = 64
    out = ncut.main(["--image", str(image), "--model_type", "vit_t", "--weights", str(weights),
                     "--image_sizes", "128,64", "--layers", "3,11", "--cell", str(cell),
                     "--output", str(tmp_path / "pics" / "ncut.png")])
    picture = cv2.imread(str(out))
    rows, cols = 2, 1 + 2 * 2  # layers; image + (base, fine-tuned) per size
    ch, cw = 48, 64  # the 96 x 128 image's aspect, longest side = cell
    assert picture.shape == (22 + rows * (ch + 2), cols * (cw + 2), 3)
    assert ncut.grid_shape(2, 2, True, (96, 128), cell) == picture.shape[:2]
    assert ncut.cell_box((200, 100), cell) == (64, 32)  # portrait: the height is the long side

    def cell_at(r, c):
        top = 22 + r * (ch + 2)
        return picture[top : top + ch, c * (cw + 2) : c * (cw + 2) + cw].astype(int)

    for r in range(rows):
        for c in range(1, cols):
            tokens = cell_at(r, c)
            assert tokens.std() > 10, (r, c)
            assert (tokens.sum(-1) > 0).mean() > 0.9, (r, c)  # the token picture fills its cell
        assert np.abs(cell_at(r, 1) - cell_at(r, 2)).mean() > 5  # 128 base vs fine-tuned


def test_bad_input_is_reported_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(ncut, "build_base", no_model)
    image = photo(tmp_path / "photo.png")
    with pytest.raises(ValueError, match=r"--layers 2,12: \[12\] out of range, vit_t's encoder has blocks 0\.\.11"):
        ncut.main(["--image", str(image), "--layers", "2,12", "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match=r"blocks 0\.\.11"):
        ncut.main(["--image", str(image), "--model_type", "vit_b", "--layers", "-1", "--output", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="--image .*missing.jpg not found"):
        ncut.main(["--image", str(tmp_path / "missing.jpg"), "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="--image_sizes 256,100: \\[100\\] not a multiple of 16"):
        ncut.main(["--image", str(image), "--image_sizes", "256,100", "--output", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="--weights .*nope.pth not found"):
        ncut.main(["--image", str(image), "--weights", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match=r"^--n_eig must be at least 4 \(the colours use the leading 3\), got 0$"):
        ncut.main(["--image", str(image), "--n_eig", "0", "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="^--cell must be at least 32 pixels, got 0$"):
        ncut.main(["--image", str(image), "--cell", "0", "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_missing_ncut_pytorch_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ncut_pytorch", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"pip install --no-deps ncut-pytorch==3\.2\.0 fpsample==0\.3\.3"):
        ncut.main(["--image", str(photo(tmp_path / "photo.png")), "--output", str(tmp_path / "x.png")])
