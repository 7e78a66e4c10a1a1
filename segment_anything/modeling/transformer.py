"""The two-way transformer of SAM's mask decoder: tokens and image attend to each other."""

import math
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import LOW_PRECISION_EXPLICIT, MLPBlock


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            [
                TwoWayAttentionBlock(
                    embedding_dim=embedding_dim,
                    num_heads=num_heads,
                    mlp_dim=mlp_dim,
                    activation=activation,
                    attention_downsample_rate=attention_downsample_rate,
                    skip_first_layer_pe=(i == 0),
                )
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor, image_index: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            image_embedding: (B, C, H, W); image_pe: (1 or B, C, H, W); point_embedding: (P, N, C).
            image_index: (P,) the image each prompt attends to; None: B == P, prompt i reads image i.
        Returns:
            processed tokens (P, N, C) and image features (P, H * W, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe,
                                  image_index=image_index)
            image_index = None  # from here on every prompt has its own image features
        q = queries + point_embedding
        k = keys + image_pe
        queries = queries + self.final_attn_token_to_image.tokens_to_image(q, k, keys)
        return self.norm_final_attn(queries), keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, image_index: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """queries (P, N, C); keys (P, HW, C), or (B, HW, C) with image_index (P,) -> both (P, ., C).

        With image_index, the image-side projections that do not depend on the prompt (the
        token->image keys and values, the image->token queries) run once per image instead of
        once per prompt: the first block's image features are the same for every prompt of an
        image until its image->token update.
        """
        if self.skip_first_layer_pe:
            # The first layer's queries are the prompt embeddings themselves, already positional.
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        if image_index is None:
            attended = self.cross_attn_token_to_image.tokens_to_image(q, k, keys)
        else:  # shared per image: the standard projections run once per image
            attended = self.cross_attn_token_to_image(q=q, k=k, v=keys, kv_index=image_index)
        queries = self.norm2(queries + attended)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        update = self.cross_attn_image_to_token.image_to_tokens(k, q, queries, q_index=image_index)
        keys = self.norm4(per_prompt(keys, image_index) + update)
        return queries, keys


def per_prompt(x: Tensor, image_index: Optional[Tensor]) -> Tensor:
    """(B, ...) per-image rows -> (P, ...) per-prompt rows; x itself when image_index is None.
    One image is a broadcast view (no copy; its gradient is a sum)."""
    if image_index is None:
        return x
    if x.shape[0] == 1:
        return x.expand(image_index.shape[0], *x.shape[1:])
    return x[image_index]


class Attention(nn.Module):
    """Multi-head attention whose q/k/v may be projected to a smaller internal width."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"num_heads {num_heads} must divide internal dim {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, h, n, c = x.shape
        return x.transpose(1, 2).reshape(b, n, h * c)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, q_index: Optional[Tensor] = None, kv_index: Optional[Tensor] = None
    ) -> Tensor:
        """q: (P, Nq, C), k and v: (P, Nk, C) -> (P, Nq, C). A side given per image, (B, N, C),
        with its index (P,) is projected once per image and then shared by its prompts."""
        if kv_index is not None and q_index is None and k.shape[0] == 1:
            # One image: the prompts' queries form one sequence against its keys, with no
            # per-prompt view of them (whose gradient would be a sum over the prompts).
            p, t, _ = q.shape
            return self(q.reshape(1, p * t, -1), k, v).view(p, t, -1)
        q = self._separate_heads(per_prompt(self.q_proj(q), q_index))
        k = self._separate_heads(per_prompt(self.k_proj(k), kv_index))
        v = self._separate_heads(per_prompt(self.v_proj(v), kv_index))
        if q.device.type == "cpu" and q.dtype in LOW_PRECISION_EXPLICIT:
            # A handful of tokens on one side: the scores are small, and on CPU the fused
            # kernel's bf16 backward runs far below the bf16 matrix-product rate.
            attn = torch.softmax((q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2), dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]))
        return self.out_proj(self._recombine_heads(out))

    # The cross-attentions have a handful of prompt tokens (T, e.g. 5 output tokens and a box's
    # 2 corners) on one side and thousands of image rows (N) on the other. A projection is linear,
    # so the image side need not be projected: with H heads of width d, the scores
    # q_t . (W_k x + b_k) = (W_k^T q_t) . x + q_t . b_k, the values sum_x a_tx (W_v x + b_v)
    # = W_v (sum_x a_tx x) + b_v, and an output projection W_o (sum_t a_xt v_t) + b_o =
    # sum_t a_xt (W_o v_t) + b_o. The N x C x C/2 projections become N x C x H T products:
    # 2.3x fewer operations for a box (H T = 56 < 128 channels), same values. Used when the
    # projections are plain linear layers (not adapters) and H T is below the internal width.

    def folds(self, num_tokens: int) -> bool:
        """Whether the image side can skip its projections for num_tokens prompt tokens."""
        plain = all(type(m) is nn.Linear for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        return plain and self.num_heads * num_tokens < self.internal_dim

    def tokens_to_image(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Tokens q (P, T, C) attend to image rows k, v (P, N, C) -> (P, T, C), as forward."""
        p, t, c = q.shape
        if not self.folds(t):
            return self(q=q, k=k, v=v)
        h, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self._separate_heads(self.q_proj(q)) * (1.0 / math.sqrt(d))  # P, H, T, d
        qk = torch.einsum("phtd,hdc->phtc", qh, self.k_proj.weight.view(h, d, c)).reshape(p, h * t, c)
        # q_t . b_k is the same for every image row, so the softmax cancels it; it is kept so
        # that b_k stays in the graph (DDP expects a gradient, here zero) as in forward.
        shift = (qh * self.k_proj.bias.view(h, 1, d)).sum(-1).reshape(p, 1, h * t)
        # Image rows on the left of every product: their gradients come out contiguous.
        attn = torch.softmax(torch.baddbmm(shift, k, qk.transpose(1, 2)), dim=1)  # P, N, H T
        z = torch.bmm(attn.transpose(1, 2), v).view(p, h, t, c)
        out = torch.einsum("phtc,hdc->phtd", z, self.v_proj.weight.view(h, d, c)) + self.v_proj.bias.view(h, 1, d)
        return self.out_proj(self._recombine_heads(out))

    def image_to_tokens(self, q: Tensor, k: Tensor, v: Tensor, q_index: Optional[Tensor] = None) -> Tensor:
        """Image rows q (P, N, C), or (B, N, C) per image with q_index (P,), attend to tokens
        k, v (P, T, C) -> (P, N, C), as forward. Per-image rows are projected once per image."""
        p, t, c = k.shape
        if not self.folds(t):
            return self(q=q, k=k, v=v, q_index=q_index)
        h, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self._separate_heads(self.k_proj(k)) * (1.0 / math.sqrt(d))  # P, H, T, d
        # Scores laid out (P, H, T, N): the softmax over the few tokens then runs along
        # contiguous rows of N (far faster on CPU than over a trailing axis of T).
        if q_index is not None:
            qh = self._separate_heads(self.q_proj(q))  # B, H, N, d
            if qh.shape[0] == 1:  # one image: all prompts' tokens in one product per head
                scores = kh.transpose(0, 1).reshape(h, p * t, d) @ qh[0].transpose(-1, -2)
                scores = scores.view(h, p, t, -1).transpose(0, 1)  # P, H, T, N
            else:
                scores = kh @ per_prompt(qh, q_index).transpose(-1, -2)  # P, H, T, N
        else:
            kq = torch.einsum("phtd,hdc->phtc", kh, self.q_proj.weight.view(h, d, c)).reshape(p, h * t, c)
            shift = (kh * self.q_proj.bias.view(h, 1, d)).sum(-1).reshape(p, 1, h * t)
            scores = torch.baddbmm(shift, q, kq.transpose(1, 2)).transpose(1, 2).view(p, h, t, -1)
        attn = torch.softmax(scores, dim=2).reshape(p, h * t, -1)  # P, H T, N
        vh = self._separate_heads(self.v_proj(v))  # P, H, T, d
        u = torch.einsum("phtd,chd->phtc", vh, self.out_proj.weight.view(c, h, d)).reshape(p, h * t, c)
        return torch.baddbmm(self.out_proj.bias, attn.transpose(1, 2), u)
