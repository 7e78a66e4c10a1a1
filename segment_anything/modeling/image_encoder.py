"""The ViT image encoder of SAM (vit_b / vit_l / vit_h).

Windowed and global attention blocks with decomposed relative-position terms, as in the
official model; state-dict keys are the official ones. Attention runs through
``scaled_dot_product_attention`` so the (heads, N, N) score matrix and the relative-position
bias are never materialised for the global blocks (see ``Attention.forward``).
"""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import LOW_PRECISION_EXPLICIT, LayerNorm2d, MLPBlock

# Scores per chunk in rel_pos_attention, by path (measured: docs/performance-encoder.md).
FUSED_CHUNK = 2**23
EXPLICIT_CHUNK = 2**20


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Tuple[int, ...] = (),
    ) -> None:
        """
        Args:
            img_size: side of the square input image, in pixels (must be a multiple of patch_size).
            patch_size: side of a patch; the embedding grid is img_size // patch_size.
            window_size: side of the attention window for non-global blocks (0: all global).
            global_attn_indexes: blocks that attend over the whole grid.
        """
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.use_checkpoint = False  # recompute blocks in the backward pass (utils.trainable, --grad_checkpoint)
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))

        self.blocks = nn.ModuleList()
        for i in range(depth):
            is_global = i in global_attn_indexes
            self.blocks.append(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    use_rel_pos=use_rel_pos,
                    rel_pos_zero_init=rel_pos_zero_init,
                    window_size=0 if is_global else window_size,
                    input_size=(grid, grid),
                )
            )

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, img_size, img_size) normalised image -> (B, out_chans, grid, grid)."""
        x = self.patch_embed(x)  # B, grid, grid, C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        recompute = self.use_checkpoint and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when window_size > 0."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            # One embedding per relative offset, -(size-1) .. (size-1), per axis.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, _ = x.shape
        # Strided (B, heads, N, head_dim) views; the fused kernel reads them without a copy.
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            out = rel_pos_attention(q, k, v, self.scale, self.rel_pos_h, self.rel_pos_w, (H, W))
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2)
        return self.proj(out.reshape(B, H, W, -1))


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Tuple[int, int],
    max_bias_elements: Optional[int] = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v with SAM's decomposed relative-position bias.

    q, k, v: (B, heads, N, C) with N = size[0] * size[1]; returns (B, N, heads, C).
    The bias for query (i, j) and key (m, n) is q_ij . Rh[i - m] + q_ij . Rw[j - n]: two small
    (N, H) and (N, W) tables per head. The official code expands them into a full N x N bias
    added to a materialised score matrix: several passes over 800 MB per image for a 64 x 64
    global block, bound by memory bandwidth. Here the attention runs on chunks (whole samples,
    or one head's block of queries) of at most max_bias_elements scores, and without autograd
    one bias buffer serves every chunk. The score matrix is never stored whole.
    Two paths (docs/performance-encoder.md has the measurements behind both):
    - the fused kernel (scaled_dot_product_attention with the bias as its mask; default chunk
      2**23 scores, half a head of a 64 x 64 grid): large chunks, because every call repacks its
      whole right-hand operands (one head's keys, then values);
    - explicit products (LOW_PRECISION_EXPLICIT dtypes on CPU, without autograd): the keys and
      values are made dense once, the bias is written into the buffer and the scores are
      accumulated onto it by the matrix product itself (baddbmm), so the bias costs one pass
      over the scores instead of three; smaller chunks (default 2**20) then keep the scores
      in cache between the product, the softmax and the product with the values.
    (Appending the tables to q and one-hot codes to k gives the same scores in one kernel
    call, but triples the head size; it measured slower on CPU.)
    """
    H, W = size
    B, heads, N, C = q.shape
    Rh = get_rel_pos(H, H, rel_pos_h)  # (H, H, C)
    Rw = get_rel_pos(W, W, rel_pos_w)  # (W, W, C)
    r_q = q.reshape(B, heads, H, W, C)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh).reshape(B, heads, N, H, 1).to(q.dtype)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw).reshape(B, heads, N, 1, W).to(q.dtype)

    reuse = not (torch.is_grad_enabled() and (q.requires_grad or rel_pos_h.requires_grad))
    explicit = reuse and q.device.type == "cpu" and q.dtype in LOW_PRECISION_EXPLICIT
    if max_bias_elements is None:
        max_bias_elements = EXPLICIT_CHUNK if explicit else FUSED_CHUNK
    if heads * N * N <= max_bias_elements:  # small grids (windows): whole samples per call
        samples, head_step, rows = max(1, max_bias_elements // (heads * N * N)), heads, N
    else:  # large grids: one head, a block of queries
        samples, head_step, rows = 1, 1, max(1, max_bias_elements // N)
    samples = min(samples, B)
    if explicit:  # scores from plain matrix products; see LOW_PRECISION_EXPLICIT
        # Keys and values as dense per-head blocks, copied once rather than gathered from the
        # qkv layout by every chunk's product.
        k = (k * scale).transpose(-1, -2).contiguous()
        v = v.contiguous()
    buffer = q.new_empty(samples, head_step, rows, H, W) if reuse else None
    out = q.new_empty(B, N, heads, C)
    for b in range(0, B, samples):
        b1 = min(B, b + samples)
        for h in range(0, heads, head_step):
            h1 = h + head_step
            for r in range(0, N, rows):
                r1 = min(N, r + rows)
                a, c = rel_h[b:b1, h:h1, r:r1], rel_w[b:b1, h:h1, r:r1]
                if explicit:
                    n = (b1 - b) * (h1 - h)
                    scores = torch.add(a, c, out=buffer[: b1 - b, :, : r1 - r]).view(n, r1 - r, N)
                    scores.baddbmm_(q[b:b1, h:h1, r:r1].reshape(n, r1 - r, C), k[b:b1, h:h1].reshape(n, C, N))
                    part = torch.matmul(torch.softmax(scores, -1).view(b1 - b, h1 - h, r1 - r, N), v[b:b1, h:h1])
                else:
                    bias = torch.add(a, c, out=buffer[: b1 - b, :, : r1 - r]) if reuse else a + c
                    part = F.scaled_dot_product_attention(
                        q[b:b1, h:h1, r:r1], k[b:b1, h:h1], v[b:b1, h:h1],
                        attn_mask=bias.reshape(b1 - b, h1 - h, r1 - r, N), scale=scale,
                    )
                out[b:b1, r:r1, h:h1] = part.transpose(1, 2)
    return out




def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * num_windows, window, window, C), zero-padding H and W up to the window."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of window_partition: (B * num_windows, window, window, C) -> (B, H, W, C)."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the (q_size, k_size, C) relative-position embeddings for every query/key pair.

    A table whose length does not match 2 * max(q_size, k_size) - 1 (a checkpoint trained at
    another resolution) is linearly resized first.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = resize_rel_pos(rel_pos, max_rel_dist)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a (L, C) relative-position table to (length, C)."""
    resized = F.interpolate(
        rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear"
    )
    return resized.reshape(-1, length).permute(1, 0)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> channels-last embeddings."""

    def __init__(
        self,
        kernel_size: Tuple[int, int] = (16, 16),
        stride: Tuple[int, int] = (16, 16),
        padding: Tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H / stride, W / stride, embed_dim), contiguous.

        Without the copy, every later layer would work on a channels-first memory layout
        behind a channels-last view, and each norm and residual add would pay for it."""
        return self.proj(x).permute(0, 2, 3, 1).contiguous()
