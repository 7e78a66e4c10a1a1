"""What trains: model parts (--train), LoRA adapters, gradient checkpointing, the parameters that
can never get a gradient, train/eval modes, and what best.pth holds.

Set-up order (engine.build_model): build -> load checkpoint -> configure(sam, plan) -> to device
-> DDP. Every parameter left trainable gets a gradient in every step for the plan's prompts, so
DDP needs no find_unused_parameters (tests/utils/test_trainable.py checks each plan).
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..modeling.fft_attention import fft_block_indices
from ..modeling.lora import TARGETS as LORA_TARGETS
from ..modeling.lora import add_lora, lora_layers, merge_into
from .save_weight import trainable_state_dict, unwrap_model

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
LORA_SAVES = ("merged", "adapters")


def grad_if_trained(module: nn.Module):
    """Autograd on for a part with trainable parameters, off for a frozen one (no graph kept for it)."""
    return nullcontext() if any(p.requires_grad for p in module.parameters()) else torch.no_grad()


def parse_parts(spec: str) -> Tuple[str, ...]:
    """'mask_decoder,prompt_encoder' | 'all' -> parts in model order; ValueError for unknown names."""
    names = [p.strip() for p in str(spec).split(",") if p.strip()]
    if names == ["all"]:
        return PARTS
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise ValueError(f"--train: unknown part(s) {unknown or spec!r}; choose from {', '.join(PARTS)}, "
                         "a comma-separated set, or all")
    return tuple(p for p in PARTS if p in names)


@dataclass(frozen=True)
class TrainPlan:
    """Everything that decides which parameters train."""

    parts: Tuple[str, ...] = ("mask_decoder",)
    prompt: str = "box"  # the training prompts: which prompt-encoder embeddings are ever used
    multimask: bool = False  # the three multimask outputs reach the loss (single-point prompts)
    mask_prompt: bool = False  # previous logits are fed back as mask prompts (corrective clicks)
    lora_rank: int = 0  # 0 = no adapters
    lora_alpha: float = 8.0
    lora_targets: Tuple[str, ...] = ("qkv", "proj")
    grad_checkpoint: bool = False

    @property
    def uses_boxes(self) -> bool:
        return "box" in self.prompt or self.prompt == "mixed"

    @property
    def uses_points(self) -> bool:
        """Point prompts, or corrective clicks (positive and negative points, -1 for none)."""
        return "point" in self.prompt or self.prompt == "mixed" or self.mask_prompt

    @property
    def broadcast_buffers(self) -> bool:
        """A training TinyViT's BatchNorm statistics must stay equal on all ranks (DDP copies
        rank 0's at every forward); frozen parts' buffers never change."""
        return "image_encoder" in self.parts

    @property
    def find_unused_parameters(self) -> bool:
        """Mixed prompts draw box or points per object: a step may hold no box (or no point),
        and then a trained prompt encoder's box (or point) embeddings are outside the graph."""
        return self.prompt == "mixed" and "prompt_encoder" in self.parts


def plan_errors(parts: Sequence[str], lora_rank: int, lora_targets: Sequence[str]) -> List[str]:
    """validate() messages for combinations that cannot work."""
    errors = []
    if lora_rank and "image_encoder" in parts and set(lora_targets) & {"qkv", "proj"}:
        errors.append("--lora_rank with --train image_encoder: the whole encoder trains already; "
                      "use one or the other")
    if lora_rank and "mask_decoder" in parts and "decoder" in lora_targets:
        errors.append("--lora_targets decoder with --train mask_decoder: the whole decoder trains already; "
                      "drop mask_decoder from --train or decoder from --lora_targets")
    return errors


def never_used(sam: nn.Module, plan: TrainPlan) -> Tuple[str, ...]:
    """Parameter-name prefixes that no step of this plan can give a gradient."""
    out = []
    if hasattr(sam.image_encoder, "head"):  # TinyViT's ImageNet classifier: SAM uses the neck only
        out += ["image_encoder.norm_head.", "image_encoder.head."]
    if not plan.multimask:  # single-mask decoding reaches mask token 0's head only
        heads = len(sam.mask_decoder.output_hypernetworks_mlps)
        out += [f"mask_decoder.output_hypernetworks_mlps.{i}." for i in range(1, heads)]
    if not plan.uses_boxes:  # the two box-corner embeddings
        out += ["prompt_encoder.point_embeddings.2.", "prompt_encoder.point_embeddings.3."]
    if not plan.uses_points:  # negative, positive and padding points
        out += ["prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.",
                "prompt_encoder.not_a_point_embed."]
    if not plan.mask_prompt:
        out += ["prompt_encoder.mask_downscaling."]
    for i in fft_block_indices(sam):  # kept for the stock keys; the FFT mixer does not read them
        out += [f"image_encoder.blocks.{i}.attn.rel_pos_h", f"image_encoder.blocks.{i}.attn.rel_pos_w"]
    return tuple(out)


def configure(sam: nn.Module, plan: TrainPlan) -> List[str]:
    """Freeze everything but the plan's parts (less never-used parameters), add LoRA adapters,
    switch on gradient checkpointing; returns the names of the LoRA-adapted layers."""
    skip = never_used(sam, plan)
    for name, module in sam.named_children():
        module.requires_grad_(name in plan.parts)
    for name, p in sam.named_parameters():
        if name.startswith(skip):
            p.requires_grad_(False)
    adapted = add_lora(sam, plan.lora_rank, plan.lora_alpha, plan.lora_targets) if plan.lora_rank else []
    if plan.grad_checkpoint:
        enable_grad_checkpoint(sam.image_encoder)
    return adapted


def enable_grad_checkpoint(encoder: nn.Module) -> None:
    """Recompute the encoder's blocks in the backward pass (when the encoder gets gradients)."""
    if hasattr(encoder, "layers"):  # TinyViT: per-stage flag
        for stage in encoder.layers:
            stage.use_checkpoint = True
    else:
        encoder.use_checkpoint = True


def set_train_mode(sam: nn.Module) -> None:
    """Train mode for the parts that train, eval for the rest; inside a training part, BatchNorm
    layers whose own parameters are frozen (TinyViT under LoRA) stay in eval mode too, so
    running statistics never move unless those layers train."""
    for module in sam.children():
        module.train(any(p.requires_grad for p in module.parameters()))
    for module in sam.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def parameter_counts(sam: nn.Module) -> Dict[str, Tuple[int, int]]:
    """{part: (trainable, total)} for the three parts, plus 'lora' (adapter parameters) and 'all'."""
    counts: Dict[str, Tuple[int, int]] = {}
    for part in PARTS:
        params = list(getattr(sam, part).parameters())
        counts[part] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(sam).values())
    counts["lora"] = (lora, lora)
    counts["all"] = (sum(c[0] for k, c in counts.items() if k in PARTS), sum(c[1] for k, c in counts.items() if k in PARTS))
    return counts


def parameter_report(sam: nn.Module) -> str:
    """The lines the log prints at start: trainable / total per part."""
    lines = []
    for name, (trained, total) in parameter_counts(sam).items():
        if name == "lora" and not total:
            continue
        label = "  of which LoRA adapters" if name == "lora" else name
        lines.append(f"{label:<24} trainable {trained:>12,} / {total:>12,}")
    return "\n".join(lines)


def trained_state_dict(sam: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable parameters plus the running statistics of BatchNorm layers that train
    (TinyViT under --train image_encoder): training moves those buffers too, and a file
    without them would pair new BatchNorm weights with stale statistics. CPU copies."""
    out = trainable_state_dict(sam)
    for name, module in unwrap_model(sam).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in module.parameters()):
            out.update({f"{name}.{b}": t.detach().to("cpu", copy=True) for b, t in module.named_buffers()})
    return out


def export_weights(sam: nn.Module, lora_save: str = "merged") -> Dict[str, torch.Tensor]:
    """What best.pth holds: the trained parameters (trained_state_dict) under stock keys.

    'merged': adapters folded into their layer's weight (``...attn.qkv.weight``), so stock SAM
    loads the file with load_state_dict(strict=False); 'adapters': the ``lora_A`` / ``lora_B``
    tensors themselves (load_partial_weight merges them on load).
    """
    weights = trained_state_dict(sam)
    return merge_into(weights, unwrap_model(sam)) if lora_save == "merged" else weights


def lora_metadata(plan: TrainPlan, lora_save: str) -> Dict:
    """Plain values stored in best.pth beside the weights (load_partial_weight reads 'scaling')."""
    if not plan.lora_rank:
        return {}
    return {"lora": {"rank": plan.lora_rank, "alpha": plan.lora_alpha, "scaling": plan.lora_alpha / plan.lora_rank,
                     "targets": list(plan.lora_targets), "save": lora_save}}


__all__ = ["PARTS", "LORA_SAVES", "LORA_TARGETS", "TrainPlan", "configure", "export_weights", "lora_metadata",
           "never_used", "parameter_counts", "parameter_report", "parse_parts", "plan_errors", "set_train_mode", "trained_state_dict"]
