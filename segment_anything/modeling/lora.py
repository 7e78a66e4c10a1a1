"""Low-rank adapters (LoRA) on linear layers, with the base layer's state-dict keys unchanged.

``LoRALinear`` keeps the wrapped layer's ``weight`` and ``bias`` under their own names and adds
``lora_A`` (r, in) and ``lora_B`` (out, r): ``y = x W^T + b + (alpha / r) * x A^T B^T``. So a
model with adapters still has every official key (``image_encoder.blocks.0.attn.qkv.weight``),
resume files and checkpoint loading work unchanged, and merging is one matrix product per layer.

Why not peft: peft wraps an ``nn.Linear`` (our fused ``qkv`` too: one A/B pair over the fused
q, k, v output, as here) but moves its weight to ``qkv.base_layer.weight`` and the adapters to
``qkv.lora_A.default.weight``; every load and save would need a key remap. peft is used in the
tests as the reference for the forward pass and the initialisation.
"""

import math
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# --lora_targets names -> the attribute names of the linear layers they adapt, and where.
TARGETS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "qkv": ("image_encoder", ("qkv",)),
    "proj": ("image_encoder", ("proj",)),
    "decoder": ("mask_decoder.transformer", ("q_proj", "k_proj", "v_proj", "out_proj")),
}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update. (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: keys and values as before
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        # B = 0: the adapted model starts exactly as the base model. A as nn.Linear's default init.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(spec: str) -> List[str]:
    """'qkv,proj' -> ['qkv', 'proj']; ValueError for unknown names."""
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora_targets: unknown or empty {unknown or spec!r}; choose from {', '.join(TARGETS)}")
    return names


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str]) -> List[str]:
    """Replace the targeted nn.Linear layers of a Sam in place by LoRALinear; returns their names.

    Only the adapters are trainable in the replaced layers; other parameters keep their flags.
    """
    wrapped = []
    for target in targets:
        root_name, attrs = TARGETS[target]
        root = model.get_submodule(root_name)
        for name, module in list(root.named_modules()):
            for attr in attrs:
                child = getattr(module, attr, None)
                if isinstance(child, nn.Linear):
                    setattr(module, attr, LoRALinear(child, rank, alpha))
                    wrapped.append(f"{root_name}.{name}.{attr}" if name else f"{root_name}.{attr}")
    if not wrapped:
        raise ValueError(f"--lora_targets {list(targets)}: no such linear layer in this model")
    return wrapped


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_into(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict (keys of model) with every adapter pair replaced by its layer's merged weight,
    under the layer's own key (``...qkv.weight``), as a detached CPU copy."""
    out = dict(state_dict)
    for name, layer in lora_layers(model).items():
        had = [out.pop(f"{name}.lora_A", None), out.pop(f"{name}.lora_B", None)]
        if any(t is not None for t in had):
            out[f"{name}.weight"] = layer.merged_weight().detach().to("cpu", copy=True)
    return out

