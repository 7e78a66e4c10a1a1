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
        queries = queries + self.final_attn_token_to_image(q=q, k=k, v=keys)
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
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys, kv_index=image_index))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        update = self.cross_attn_image_to_token(q=k, k=q, v=queries, q_index=image_index)
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
