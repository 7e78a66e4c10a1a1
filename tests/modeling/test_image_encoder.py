"""The bf16 attention path of the ViT encoder (explicit score products on CPU) against float32."""

import pytest
import torch

from conftest import relative_error
from segment_anything.modeling import image_encoder
from segment_anything.modeling.image_encoder import get_rel_pos, rel_pos_attention


def reference_attention(q, k, v, scale, rel_pos_h, rel_pos_w, size):
    """The official formula in float32: full score matrix plus the expanded decomposed bias."""
    H, W = size
    B, heads, N, C = q.shape
    q, k, v = q.float(), k.float(), v.float()
    Rh, Rw = get_rel_pos(H, H, rel_pos_h.float()), get_rel_pos(W, W, rel_pos_w.float())
    r_q = q.reshape(B, heads, H, W, C)
    bias = (torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)[..., :, None]
            + torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)[..., None, :]).reshape(B, heads, N, N)
    attn = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1)
    return (attn @ v).transpose(1, 2)


# (B, heads, H, W, max_bias_elements): small windows batched per call, and a grid chunked into
# one head's block of queries (the global-block path), with a last chunk shorter than the rest.
CASES = [(5, 3, 7, 7, 2**21), (1, 2, 12, 10, 12 * 10 * 50)]


@pytest.mark.parametrize("case", CASES)
def test_bf16_explicit_path_matches_float32(case):
    B, heads, H, W, max_bias = case
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, H * W, 16, generator=gen) for _ in range(3))
    rel_h, rel_w = (torch.randn(2 * n - 1, 16, generator=gen) * 0.3 for n in (H, W))
    ref = reference_attention(q, k, v, 0.25, rel_h, rel_w, (H, W))
    fp32 = rel_pos_attention(q, k, v, 0.25, rel_h, rel_w, (H, W), max_bias)
    assert relative_error(fp32, ref) < 1e-5
    low = [t.bfloat16() for t in (q, k, v, rel_h, rel_w)]
    assert torch.bfloat16 in image_encoder.LOW_PRECISION_EXPLICIT
    explicit = rel_pos_attention(*low[:3], 0.25, *low[3:], (H, W), max_bias)
    assert explicit.dtype == torch.bfloat16 and relative_error(explicit, ref) < 2e-2
    try:  # the same inputs through the fused kernel
        image_encoder.LOW_PRECISION_EXPLICIT = set()
        fused = rel_pos_attention(*low[:3], 0.25, *low[3:], (H, W), max_bias)
    finally:
        image_encoder.LOW_PRECISION_EXPLICIT = {torch.bfloat16}
    assert relative_error(explicit, fused) < 2e-2
