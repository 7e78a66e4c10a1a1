"""The TinyViT image encoder of MobileSAM (vit_t).

Module names, parameter shapes and outputs match MobileSAM's ``tiny_vit_sam.TinyViT`` so its
checkpoints load strictly; the unused ImageNet classifier (``norm_head``, ``head``) is kept only
for that reason. Unlike the original, spatial sizes come from the input instead of a
hard-coded 64x64 grid, the resolution-keeping last merge is chosen by position instead of by
channel count, nothing is registered with timm, and timm is not imported (modeling.common
has the stochastic-depth module).

Feature maps travel between blocks as (B, C, H, W); the attention blocks work channels-last
inside and hand back permuted views, so the layout changes cost no copies.
"""

import contextlib
from functools import partial
from typing import ContextManager, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import DropPath, LayerNorm2d


class ConvBN(nn.Sequential):
    """Bias-free 'same' convolution followed by BatchNorm (keys ``c.*``, ``bn.*``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: (B, in_chans, H, W) -> (B, embed_dim, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (expand, depthwise 3x3, project): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        # A zero BN scale makes the residual branch start switched off.
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.drop_path(self.conv3(y)))


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv with the given stride, 1x1 conv.

    (B, dim, H, W) -> (B, out_dim, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class Mlp(nn.Module):
    """Pre-norm feed-forward: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


def offset_index(window_size: int) -> torch.Tensor:
    """(N, N) bias index |dy| * window_size + |dx| of every query/key pair, N = window_size**2.

    This is the order in which the original code first meets each offset, so checkpoints'
    ``attention_biases`` columns line up.
    """
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = (rows[:, None] - rows[None, :]).abs()
    dx = (cols[:, None] - cols[None, :]).abs()
    return dy * window_size + dx


class Attention(nn.Module):
    """Pre-norm multi-head attention within a window, with one learned bias per head and per
    (|dy|, |dx|) offset: (B, N, dim) -> (B, N, dim), N = window_size**2."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size**2))
        # Derived from window_size, so it stays out of checkpoints.
        self.register_buffer("attention_bias_idxs", offset_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # Checkpoints lay qkv out per head as [q, k, v], not as [all q, all k, all v].
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, 3, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        # Gathered on every call rather than cached, so it can never go stale after loading
        # weights. A 4-D mask takes the fused CPU kernel; a 3-D one runs a slower path.
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0).to(q.dtype)
        if x.is_cpu and (q.requires_grad or bias.requires_grad):
            # With autograd, SDPA on CPU falls back to this same unfused math, only slower.
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
            x = attn.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise conv, MLP, each residual: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + self.drop_path(self._window_attention(x))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.mlp(x))
        return x.permute(0, 3, 1, 2)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), attending within non-overlapping windows."""
        B, H, W, C = x.shape
        w = self.window_size
        # The zero padding is normalised and attended to like real tokens (no mask), as in
        # the original: the released weights were trained that way.
        pad_h, pad_w = -H % w, -W % w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (H + pad_h) // w, (W + pad_w) // w
        x = x.reshape(B, nh, w, nw, w, C).transpose(2, 3).reshape(B * nh * nw, w * w, C)
        x = self.attn(x)
        x = x.view(B, nh, nw, w, w, C).transpose(2, 3).reshape(B, nh * w, nw * w, C)
        return x[:, :H, :W]


@contextlib.contextmanager
def _bn_stats_kept(module: nn.Module) -> Iterator[None]:
    """Undo the updates of the module's BatchNorm running statistics made inside the context."""
    buffers = [b for m in module.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _checkpoint_contexts(block: nn.Module) -> Tuple[ContextManager, ContextManager]:
    """(forward, recompute) contexts for checkpoint: recomputing a block in the backward pass
    must not move its BatchNorm statistics a second time."""
    return contextlib.nullcontext(), _bn_stats_kept(block)


class Stage(nn.Module):
    """Blocks at one resolution, then an optional PatchMerging: (B, C, H, W) -> (B, C', H', W')."""

    def __init__(
        self, blocks: List[nn.Module], downsample: Optional[nn.Module], use_checkpoint: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if recompute:
                contexts = partial(_checkpoint_contexts, blk)
                x = checkpoint(blk, x, use_reentrant=False, context_fn=contexts)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """TinyViT backbone with SAM's neck: (B, in_chans, H, W) -> (B, out_chans, H/16, W/16).

    Stage 0 is convolutional (MBConv), the others windowed attention. The merges after
    stages 0 and 1 halve the resolution; the last keeps it, so the output stride is 16 as
    SAM's mask decoder expects (for four stages). ``img_size`` is only recorded for the Sam
    wrapper, which pads images to it; any H and W work.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        layer_lr_decay: float = 1.0,
        out_chans: int = 256,
    ) -> None:
        """
        Args:
            embed_dims, depths, num_heads, window_sizes: per stage (num_heads and window_sizes
                of stage 0 are unused: it has no attention).
            drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
            use_checkpoint: recompute blocks in the backward pass to save memory.
            layer_lr_decay: sets ``param.lr_scale`` for optimizers; no effect on outputs.
            out_chans: channels of the image embedding (SAM's prompt embedding size).
        """
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        # Linearly rising drop-path rates, in plain Python so that meta-device builds work.
        n = sum(depths)
        all_rates = [drop_path_rate * j / max(n - 1, 1) for j in range(n)]
        stage_rates = [all_rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, rates in enumerate(stage_rates):
            dim = embed_dims[i]
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio, r) for r in rates]
            else:
                args = (dim, num_heads[i], window_sizes[i], mlp_ratio, drop_rate)
                blocks = [TinyViTBlock(*args, r, local_conv_size) for r in rates]
            downsample = None
            if i + 1 < len(depths):
                # The original keys this stride on the channel count (320, 448 or 576); by
                # position it agrees for every released model and works for any widths.
                stride = 1 if i + 2 == len(depths) else 2
                downsample = PatchMerging(dim, embed_dims[i + 1], stride)
            self.layers.append(Stage(blocks, downsample, use_checkpoint))

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self._set_lr_scale(layer_lr_decay)

    def _set_lr_scale(self, decay: float) -> None:
        """Tag parameters with ``lr_scale = decay ** (number of blocks after theirs)``.

        The stem shares the first block's scale, a merge its stage's last block's, and the
        head and neck get 1.
        """
        num_blocks = sum(len(layer.blocks) for layer in self.layers)

        def tag(module: nn.Module, block_index: int) -> None:
            for p in module.parameters():
                p.lr_scale = decay ** (num_blocks - block_index - 1)

        tag(self, num_blocks - 1)
        tag(self.patch_embed, 0)
        index = 0
        for layer in self.layers:
            for blk in layer.blocks:
                tag(blk, index)
                index += 1
            if layer.downsample is not None:
                tag(layer.downsample, index - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) normalised image -> (B, out_chans, H/16, W/16) embedding."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
