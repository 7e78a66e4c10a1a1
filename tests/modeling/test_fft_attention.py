"""FFT token mixing (modeling/fft_attention.py, --attention fft): what the mixer computes against an
explicit N x N reference, the swap in the builder, stock keys, gradients, shapes, flag checks."""

import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.build_sam import VIT_CONFIGS, fft_blocks_for
from segment_anything.modeling.fft_attention import FFTAttention, fft_block_indices, parse_fft_blocks, use_fft_attention
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from segment_anything.training.config import TrainConfig
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.trainable import PARTS, TrainPlan, never_used

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_mixing(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's formulas written with the full N x N logit matrix: r[t] is the mean of
    the logits on the circular diagonal n - m = t, w = softmax_t(r), A[n, m] = w[n - m], y = proj(A v)."""
    B, H, W, C = x.shape
    N, heads = H * W, attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
    logits = q @ k.transpose(-1, -2) * attn.scale  # (B, heads, N, N)
    n = torch.arange(N)
    lag = (n[:, None] - n[None, :]) % N
    r = torch.stack([logits[..., lag == t].mean(-1) for t in range(N)], dim=-1)  # (B, heads, N lags)
    A = torch.softmax(r, dim=-1)[..., lag]  # (B, heads, N, N), circulant
    return attn.proj((A @ v).transpose(1, 2).reshape(B, H, W, C))


@pytest.mark.parametrize("hw", [(6, 5), (4, 4)], ids=["odd_N", "even_N"])
def test_fft_mixer_equals_the_explicit_circulant_formula(hw):
    torch.manual_seed(0)
    attn = FFTAttention(32, num_heads=4, use_rel_pos=True, input_size=hw)
    x = torch.randn(2, *hw, 32)
    ours, ref = attn(x), reference_mixing(attn, x)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # The kernel matters: a uniform kernel (mean pooling of v) is something else.
    pooled = attn.proj(attn.qkv(x)[..., 64:].mean(dim=(1, 2), keepdim=True).expand_as(x))
    assert not torch.allclose(ours, pooled, atol=1e-3)


def tiny_encoder(img_size: int = 64, **kw) -> ImageEncoderViT:
    """A 4-block ViT shaped like SAM's (windows + two global blocks), 32 channels."""
    enc = ImageEncoderViT(img_size=img_size, embed_dim=32, depth=4, num_heads=2, out_chans=16, use_rel_pos=True,
                          window_size=2, global_attn_indexes=(1, 3), **kw)
    return randomize_(enc, seed=1)


def test_the_swap_changes_the_encoder_output_and_keeps_the_parameters():
    standard = tiny_encoder()
    fft = tiny_encoder()
    assert use_fft_attention(fft, [1, 3]) == [1, 3]
    assert fft_block_indices(fft) == [1, 3] and fft_block_indices(standard) == []
    assert sum(isinstance(m, FFTAttention) for m in fft.modules()) == 2
    for (name, a), (_, b) in zip(standard.state_dict().items(), fft.state_dict().items()):
        assert torch.equal(a, b), name  # same keys, same values: only forward differs
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y_std, y_fft = standard(x), fft(x)
    assert y_fft.shape == y_std.shape == (1, 16, 4, 4)
    assert (y_fft - y_std).abs().max() > 1e-2 * y_std.abs().max()


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_shapes_hold_at_every_input_size(size):
    """All blocks mixing by FFT (windowed blocks mix within their windows) at 256, 512, 1024 px."""
    enc = tiny_encoder(size)
    use_fft_attention(enc, range(4))
    grid = size // 16
    with torch.no_grad():
        assert enc(torch.randn(1, 3, size, size)).shape == (1, 16, grid, grid)


def test_vit_b_builder_replaces_the_chosen_blocks_and_keeps_stock_keys_and_shapes():
    with torch.device("meta"):  # shapes only
        stock = {k: v.shape for k, v in sam_model_registry["vit_b"](image_size=1024).state_dict().items()}
        for spec, expected in (("global", [2, 5, 8, 11]), ("all", list(range(12))), ("0,7", [0, 7])):
            sam = sam_model_registry["vit_b"](image_size=1024, attention="fft", fft_blocks=spec)
            assert fft_block_indices(sam) == expected
            assert {k: v.shape for k, v in sam.state_dict().items()} == stock


def test_stock_checkpoint_loads_strictly_into_an_fft_model(tmp_path):
    path = tmp_path / "vit_b_128.pth"
    torch.save(sam_model_registry["vit_b"](image_size=128).state_dict(), path)
    sam = sam_model_registry["vit_b"](checkpoint=path, image_size=128, attention="fft")
    assert fft_block_indices(sam) == [2, 5, 8, 11]
    saved = torch.load(path, weights_only=True)
    assert torch.equal(sam.state_dict()["image_encoder.blocks.5.attn.qkv.weight"], saved["image_encoder.blocks.5.attn.qkv.weight"])


def test_every_trainable_parameter_gets_a_gradient_and_never_used_names_the_rest():
    """vit_b at 64 px, everything trainable, FFT in the global blocks: the encoder parameters without a
    gradient are exactly the FFT blocks' relative-position tables, which never_used() freezes so that
    DistributedDataParallel needs no find_unused_parameters."""
    torch.manual_seed(0)
    sam = randomize_(sam_model_registry["vit_b"](image_size=64, attention="fft"), seed=0)
    sam.image_encoder(torch.randn(1, 3, 64, 64)).square().mean().backward()
    grads = {n: p.grad for n, p in sam.image_encoder.named_parameters(prefix="image_encoder")}
    no_grad = {n for n, g in grads.items() if g is None or not g.abs().sum() > 0}
    assert no_grad == {f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5, 8, 11) for a in "hw"}
    assert {n for n in grads if n.startswith(never_used(sam, TrainPlan(parts=PARTS)))} == no_grad
    assert all(grads[f"image_encoder.blocks.{i}.attn.{p}"].abs().sum() > 0 for i in (2, 5) for p in ("qkv.weight", "proj.bias"))


def test_fft_blocks_parsing_and_configuration_errors():
    assert parse_fft_blocks("global", 12, (2, 5)) == (2, 5)
    assert parse_fft_blocks("all", 3, ()) == (0, 1, 2)
    assert parse_fft_blocks("5,1", 12, ()) == (1, 5)
    for bad in ("12", "1,1", "x"):
        with pytest.raises(ValueError, match="--fft_blocks"):
            parse_fft_blocks(bad, 12, ())
    assert fft_blocks_for("vit_h") == VIT_CONFIGS["vit_h"][3]
    base = dict(train_dir="d", checkpoint="none")
    with pytest.raises(ValueError, match="needs a ViT encoder"):
        TrainConfig(**base, model_type="vit_t", attention="fft")
    with pytest.raises(ValueError, match="in 0..23"):
        TrainConfig(**base, model_type="vit_l", attention="fft", fft_blocks="3,24")
    with pytest.raises(ValueError, match="needs --attention fft"):
        TrainConfig(**base, model_type="vit_b", fft_blocks="all")
    assert TrainConfig(**base, model_type="vit_b", attention="fft", fft_blocks="all").fft_blocks == "all"
