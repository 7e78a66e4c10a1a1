"""Deterministic random weights, for checkpoints in the official format without downloading one."""

import torch
from torch import nn

# run.py's default --seed: the train/val split, the shuffling, and the random model a --checkpoint
# none run starts from (seeded before it is built).
DEFAULT_SEED = 21


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every float tensor of ``model``'s state dict seeded values, in place.

    Non-persistent buffers (the pixel mean and std, TinyViT's index tables) are constants,
    not weights, and keep their values.

    Parameters that the official initialisation leaves at zero or one (relative-position
    tables, position embeddings, biases, norms) would make an implementation difference
    invisible, so everything gets values: weights N(0, std) scaled so activations stay O(1),
    norm scales around 1, BatchNorm running variances positive. The prompt encoder's random
    Gaussian projection keeps its N(0, 1) distribution.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith("running_var"):
            value = 0.5 + noise.abs()
        elif name.endswith("positional_encoding_gaussian_matrix"):
            value = noise
        elif tensor.dim() == 1 and ("norm" in name or name.endswith((".bn.weight", "neck.1.weight", "neck.3.weight"))):
            value = 1.0 + 0.1 * noise
        elif tensor.dim() >= 2 and "pos" not in name:
            fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
            value = noise / fan_in**0.5
        else:
            value = std * 5 * noise
        tensor.copy_(value.to(tensor.dtype))
    return model
