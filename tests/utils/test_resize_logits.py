"""resize_logits against Sam.postprocess_masks (values and gradients), on hand-computed weights,
and under bf16 autocast. With a gradient to compute it uses matrix products, without it
postprocess_masks' interpolations: both paths are checked."""

from types import SimpleNamespace

import pytest
import torch

from segment_anything.modeling import Sam
from segment_anything.utils.resize import axis_matrix, resize_logits
from segment_anything.utils.transforms import ResizeLongestSide

pytestmark = pytest.mark.usefixtures("one_thread")


def postprocess(logits, input_size, original_size, img_size):
    """The real Sam.postprocess_masks; it reads only image_encoder.img_size from the model."""
    fake = SimpleNamespace(image_encoder=SimpleNamespace(img_size=img_size))
    return Sam.postprocess_masks(fake, logits, input_size, original_size)


# (img_size, original (H, W)): originals smaller and larger than the resized input, portrait and
# landscape (input_size never square), and a 256 model whose decoder gives 64x64 logits.
CASES = [(1024, (340, 750)), (1024, (1079, 607)), (1024, (194, 259)), (256, (194, 259)), (256, (1079, 607))]


def matrix_lookups() -> int:
    """How often resize_logits took the matrix path so far (cache hits + misses)."""
    info = axis_matrix.cache_info()
    return info.hits + info.misses


def case_inputs(img_size, original, seed=0):
    input_size = ResizeLongestSide.get_preprocess_shape(*original, img_size)
    assert input_size[0] != input_size[1]
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(3, 1, img_size // 4, img_size // 4, generator=g) * 8  # logits of a typical spread
    return low, input_size


@pytest.mark.parametrize("img_size,original", CASES)
def test_values_and_gradients_match_postprocess_masks(img_size, original):
    low, input_size = case_inputs(img_size, original)
    ours_in = low.clone().requires_grad_()
    ref_in = low.double().requires_grad_()  # float64: the reference without float32's own rounding
    lookups = matrix_lookups()
    ours = resize_logits(ours_in, input_size, original, img_size)
    assert matrix_lookups() == lookups + 2  # one matrix per axis
    ref = postprocess(ref_in, input_size, original, img_size)
    assert ours.shape == ref.shape == (3, 1, *original) and ours.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (ours.double() - ref).abs().max().item() <= 1e-5 * scale
    # Float32 postprocess_masks itself is off the float64 result by ~1e-5 of the scale
    # (interpolation weights rounded in float32), so against it the bound is looser.
    assert (ours - postprocess(low, input_size, original, img_size)).abs().max().item() <= 1e-4 * scale

    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours.backward(upstream.float())
    ref.backward(upstream)
    grad_scale = ref_in.grad.abs().max().item()
    assert (ours_in.grad.double() - ref_in.grad).abs().max().item() <= 1e-5 * grad_scale


def test_a_pixel_off_is_caught():
    """The tolerance above is far below what a wrong crop or an off-by-one size gives."""
    low, input_size = case_inputs(1024, (340, 750))
    ref = postprocess(low.double(), input_size, (340, 750), 1024)
    low.requires_grad_()  # the matrix path
    scale = ref.abs().max().item()
    h, w = input_size
    wrong_crop = resize_logits(low, (h + 1, w), (340, 750), 1024)
    wrong_frame = resize_logits(low, input_size, (340, 750), 1028)
    shifted = resize_logits(low, input_size, (341, 750), 1024)[..., 1:, :]
    for bad in (wrong_crop, wrong_frame, shifted):
        assert (bad.double() - ref).abs().max().item() > 1e-2 * scale


@pytest.mark.parametrize("img_size,original", CASES[1:4])
def test_without_gradient_it_is_postprocess_masks(img_size, original):
    low, input_size = case_inputs(img_size, original)
    ref = postprocess(low, input_size, original, img_size)
    lookups = matrix_lookups()
    with torch.no_grad():
        grad_off = resize_logits(low.requires_grad_(), input_size, original, img_size)
    assert torch.equal(resize_logits(low.detach()[:, 0], input_size, original, img_size), ref[:, 0])
    assert torch.equal(grad_off, ref) and matrix_lookups() == lookups


def test_axis_matrix_by_hand():
    """2 logits -> upsample to 4 -> keep 3 -> resize to 2. Upsampling 2 -> 4 (source positions
    -0.25 clamped to 0, 0.25, 0.75, 1.25 clamped to 1) gives rows [1, 0], [.75, .25], [.25, .75],
    [0, 1]; resizing 3 -> 2 samples positions 0.25 and 1.75 of the kept three:
    row 0 = .75 [1, 0] + .25 [.75, .25], row 1 = .25 [.75, .25] + .75 [.25, .75]."""
    m = axis_matrix(2, 3, 2, 4, torch.device("cpu"), torch.float64)
    assert torch.equal(m, torch.tensor([[0.9375, 0.0625], [0.375, 0.625]], dtype=torch.float64))


def test_bf16_autocast_input_computes_in_float32():
    low, input_size = case_inputs(256, (194, 259))
    x = low.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resize_logits(x, input_size, (194, 259), 256)  # a matmul would run in bf16 here
    assert out.dtype == torch.float32
    ref = postprocess(x.detach().double(), input_size, (194, 259), 256)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
