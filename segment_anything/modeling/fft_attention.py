"""FFT token mixing: an O(N log N) stand-in for self-attention in chosen ViT blocks (--attention fft).

What ``FFTAttention`` computes, for a block input x of shape (B, H, W, C), N = H * W tokens
taken in row-major order, `heads` heads of d = C / heads channels, token indices modulo N:

    q, k, v = qkv(x)                                each (B, N, heads, d), the stock projection
    r[b, t, h] = scale / N * sum_n q[b, n, h] . k[b, n - t, h]        (B, N, heads)
               = scale / N * irfft( sum_c rfft(q)[..., c] * conj(rfft(k)[..., c]) )
    w = softmax over the lag axis t of r                               (B, N, heads), sums to 1
    out[b, n, h] = sum_t w[b, t, h] * v[b, n - t, h]                   (B, N, heads, d)
                 = irfft( rfft(v) * rfft(w) )
    y = proj(out)                                                      (B, H, W, C)

r[t] is the mean attention logit (scale = d ** -0.5, as in attention) over all query/key pairs
that lie t tokens apart on the circle of tokens: the circular cross-correlation of q and k along
the token axis, summed over the head's channels. Its softmax over the N lags is a per-head
kernel, and the values are mixed by a circular convolution with it. This equals attention with
the circulant weight matrix A[n, m] = w[n - m]: rows sum to 1 as attention's do, but every query
gets the same weights relative to its own position (translation-equivariant mixing, no
per-query selection). Every step is an FFT along the N tokens or an elementwise product on
(B, N/2+1, heads, d), so time is O(N log N) and memory O(N) per channel: no N x N tensor exists.

The lag axis is the flattened token sequence: a lag t = dy * W + dx is the 2-D offset (dy, dx),
with a row carry where the offset crosses the image's right edge, and the sequence wraps
around (circular). FFTs run in float32 (torch.fft has no bfloat16 on CPU), the result is cast
back to the input dtype.

Parameters and state-dict keys are those of ``Attention`` (``qkv``, ``proj``, and
``rel_pos_h`` / ``rel_pos_w`` when the block has them), so stock checkpoints load into an FFT
encoder and its trained weights load into stock SAM. The relative-position tables are kept for
those keys but unused: the lag kernel has no per-query term for them to bias.
utils/trainable.never_used freezes them, so DistributedDataParallel never waits for them.
"""

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .image_encoder import Attention

ATTENTIONS = ("standard", "fft")


class FFTAttention(Attention):
    """Attention's parameters, FFT token mixing in forward (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1)
        spectra = torch.fft.rfft(qkv.float(), dim=1)  # (B, N//2+1, 3, heads, d): one call for q, k, v
        q_f, k_f, v_f = spectra.unbind(2)
        cross = (q_f * k_f.conj()).sum(-1)  # (B, N//2+1, heads): the spectrum of the head's correlation
        logits = torch.fft.irfft(cross, n=N, dim=1) * (self.scale / N)  # (B, N lags, heads)
        kernel = torch.softmax(logits, dim=1)
        mixed = torch.fft.irfft(v_f * torch.fft.rfft(kernel, dim=1).unsqueeze(-1), n=N, dim=1)  # (B, N, heads, d)
        return self.proj(mixed.to(x.dtype).reshape(B, H, W, C))

    @classmethod
    def replacing(cls, attn: Attention) -> "FFTAttention":
        """An FFTAttention holding copies of attn's parameters (same keys, shapes, device, dtype)."""
        input_size = None
        if attn.use_rel_pos:  # tables of 2 * size - 1 offsets per axis
            input_size = ((attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2)
        weight = attn.qkv.weight
        with torch.device(weight.device):
            new = cls(weight.shape[1], attn.num_heads, attn.qkv.bias is not None, attn.use_rel_pos,
                      input_size=input_size).to(weight.dtype)
        if weight.device.type != "meta":
            new.load_state_dict(attn.state_dict(), strict=True)
        return new


def parse_fft_blocks(spec: str, depth: int, global_blocks: Sequence[int]) -> Tuple[int, ...]:
    """--fft_blocks 'global' | 'all' | '2,5,8' -> sorted block indices; ValueError naming the flag."""
    spec = str(spec).strip()
    if spec == "global":
        return tuple(sorted(global_blocks))
    if spec == "all":
        return tuple(range(depth))
    try:
        blocks = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--fft_blocks must be global, all or comma-separated block indices, got {spec!r}") from None
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad or len(set(blocks)) != len(blocks):
        raise ValueError(f"--fft_blocks {spec!r}: indices must be distinct and in 0..{depth - 1} "
                         f"(the encoder has {depth} blocks)")
    return tuple(sorted(blocks))


def use_fft_attention(encoder: nn.Module, blocks: Sequence[int]) -> List[int]:
    """Replace the attention of encoder.blocks[i] for i in blocks by FFTAttention, in place,
    keeping the parameter values. Returns the indices replaced."""
    for i in blocks:
        encoder.blocks[i].attn = FFTAttention.replacing(encoder.blocks[i].attn)
    return list(blocks)


def fft_block_indices(model: nn.Module) -> List[int]:
    """The encoder blocks that mix tokens by FFT (model: a Sam or its image encoder)."""
    encoder = getattr(model, "image_encoder", model)
    return [i for i, blk in enumerate(getattr(encoder, "blocks", [])) if isinstance(blk.attn, FFTAttention)]


def attention_metadata(model: nn.Module) -> dict:
    """What best.pth records beside the weights so tools rebuild the same encoder:
    {"attention": {"type": "fft", "blocks": [...]}}, or {} for stock attention."""
    blocks = fft_block_indices(model)
    return {"attention": {"type": "fft", "blocks": blocks}} if blocks else {}
