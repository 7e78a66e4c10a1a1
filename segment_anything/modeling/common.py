"""Small building blocks shared by the SAM modules."""

from typing import Type

import torch
from torch import nn

# On CPU, the fused attention kernel runs bf16 at about the float32 rate (its backward far
# below), while bf16 matrix products (oneDNN, AVX512-BF16 / AMX) run several times faster.
# Attention in these dtypes is then faster as explicit products and a softmax, on the encoder's
# 4096-token global block (no autograd, cache-sized chunks; in float32 the fused kernel stays
# ahead) and on a decoder training step (docs/performance.md).
LOW_PRECISION_EXPLICIT = {torch.bfloat16}


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (the transformer feed-forward)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., embedding_dim) -> (..., embedding_dim)."""
        h = self.lin1(x)
        if type(self.act) is nn.GELU and self.act.approximate == "none" and not (torch.is_grad_enabled() and h.requires_grad):
            # Without autograd the activation can overwrite the hidden tensor: a fresh one (50 MB
            # for vit_b at 1024) is a new mmap on every call, whose page faults cost more than the
            # GELU itself (same values; docs/performance.md).
            return self.lin2(torch.ops.aten.gelu_(h))
        return self.lin2(self.act(h))


class DropPath(nn.Module):
    """Stochastic depth for a residual branch: in training, each sample's branch output is
    zeroed with probability drop_prob and the kept ones scaled by 1 / (1 - drop_prob); the
    identity in eval. Same draws as timm's DropPath (one Bernoulli per sample from the default
    generator), written here because importing timm.layers costs about 3 CPU seconds at every
    start (it imports torchvision and torch._dynamo) for this one module."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising in channels-last order lets torch use its fused layer_norm kernel;
        # the statistics are the same as the explicit mean/var over dim 1.
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
