"""Decoder logits to the original image size for losses and metrics: what Sam.postprocess_masks
computes, with a gradient that is cheaper to get.

Sam.postprocess_masks upsamples (h, w) logits to the padded (S, S) encoder frame, crops the
valid (input_h, input_w) corner and resizes that to the original (H, W), all bilinear with
align_corners=False. Each step is linear and acts on rows and columns separately, so the chain
is ``Ah @ X @ Aw.T`` with Ah (H, h) and Aw (W, w). In training this avoids materialising an
(S, S) map per prompt and its gradient: bilinear upsampling's backward made it a visible share
of a step from cached embeddings. Without a gradient the interpolations are cheaper (the dense
products cost h multiply-adds per output pixel), so that path keeps them (timings in
docs/performance.md).
Sam.postprocess_masks stays as it is for prediction (parity with Meta's code).
"""

from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)  # (H, 256) matrices, ~1 MB at 1000 px; a miss costs two small interpolations
def axis_matrix(n_low: int, n_input: int, n_orig: int, img_size: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """(n_orig, n_low): one axis of postprocess_masks as a matrix (upsample n_low -> img_size,
    keep the first n_input, resize to n_orig; linear, align_corners=False).

    Built by running torch's own interpolation on unit impulses, so the taps and weights follow
    torch's rule rather than a re-derivation of it; in float64, so composing the two steps adds
    no rounding of its own. Row j of the identity is impulse j; interpolating it
    along the last axis gives column j of the resize matrix."""
    impulses = torch.eye(n_low, dtype=torch.float64)[None]  # (1, n_low, n_low): n_low 1-D signals
    up = F.interpolate(impulses, size=img_size, mode="linear", align_corners=False)[..., :n_input]
    out = F.interpolate(up, size=n_orig, mode="linear", align_corners=False)[0]  # (n_low, n_orig)
    return out.T.contiguous().to(device=device, dtype=dtype)


def resize_logits(logits: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                  img_size: int) -> torch.Tensor:
    """What Sam.postprocess_masks(logits, input_size, original_size) returns, to float rounding.

    Args:
        logits: (..., h, w) decoder logits (h = w = 4 * the embedding grid, e.g. 256 at 1024).
        input_size: (input_h, input_w) of the resized image inside the padded img_size frame.
        original_size: (H, W) of the original image.
        img_size: the encoder's input size S (sam.image_encoder.img_size).
    Returns:
        (..., H, W) logits, float32 (float64 for float64 input), autocast off: under CPU
        autocast a matmul would run in bf16. With a gradient to compute, the matrix products;
        without, postprocess_masks' own two interpolations (cheaper forward only).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        x = logits.to(dtype)
        if torch.is_grad_enabled() and logits.requires_grad:
            return _by_matrices(x, input_size, original_size, img_size)
        return _by_interpolation(x, input_size, original_size, img_size)


def _by_matrices(x: torch.Tensor, input_size, original_size, img_size: int) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) as Ah @ x @ Aw.T."""
    (h, w), (in_h, in_w), (out_h, out_w) = x.shape[-2:], input_size, original_size
    ah = axis_matrix(h, int(in_h), int(out_h), img_size, x.device, x.dtype)  # (H, h)
    aw = axis_matrix(w, int(in_w), int(out_w), img_size, x.device, x.dtype)  # (W, w)
    # Same result either way; multiply first along the axis that leaves less work.
    if out_h * w * (h + out_w) <= h * out_w * (w + out_h):
        return (ah @ x) @ aw.T
    return ah @ (x @ aw.T)


def _by_interpolation(x: torch.Tensor, input_size, original_size, img_size: int) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) exactly as Sam.postprocess_masks computes it."""
    (in_h, in_w), (out_h, out_w) = input_size, original_size
    flat = x.reshape(-1, 1, *x.shape[-2:])  # bilinear F.interpolate wants (N, C, h, w)
    up = F.interpolate(flat, (img_size, img_size), mode="bilinear", align_corners=False)[..., :in_h, :in_w]
    out = F.interpolate(up, (int(out_h), int(out_w)), mode="bilinear", align_corners=False)
    return out.reshape(*x.shape[:-2], *out.shape[-2:])
