"""Outputs of an image encoder's blocks, read with forward hooks on the model itself.

A "block index" counts the encoder's transformer blocks in forward order:
- ViT (vit_b/l/h): ``image_encoder.blocks[i]``, i in 0..depth-1, each (B, H/16, W/16, C).
- TinyViT (vit_t): the blocks of all stages flattened, ``image_encoder.layers[s].blocks[j]``;
  MobileSAM's stages have 2, 2, 6, 2 blocks, so indices 0-1 are stage 0 (MBConv, stride 4),
  2-3 stage 1 (stride 8), 4-9 stage 2 and 10-11 stage 3 (stride 16). A block's output is taken
  before its stage's PatchMerging, i.e. at that stage's resolution.
"""

from typing import Dict, List, Sequence

import torch
from torch import nn


def encoder_blocks(encoder: nn.Module) -> List[nn.Module]:
    """The encoder's blocks in forward order (see the module docstring for the numbering)."""
    if hasattr(encoder, "blocks"):  # ImageEncoderViT
        return list(encoder.blocks)
    if hasattr(encoder, "layers"):  # TinyViT: stages, each with its blocks
        return [blk for stage in encoder.layers for blk in stage.blocks]
    raise TypeError(f"{type(encoder).__name__} has neither .blocks (ViT) nor .layers (TinyViT)")


def channels_last(output: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """A block's output as (B, H, W, C): ViT blocks already are, TinyViT blocks give (B, C, H, W)."""
    return output if hasattr(encoder, "blocks") else output.permute(0, 2, 3, 1)


class _Enough(Exception):
    """Raised by the hook of the deepest requested block: the blocks after it are not needed."""


@torch.no_grad()
def block_outputs(encoder: nn.Module, image: torch.Tensor, indices: Sequence[int]) -> Dict[int, torch.Tensor]:
    """{i: output of block i as (B, H_i, W_i, C_i), on the CPU} for a (B, 3, S, S) input that the
    encoder's forward takes (normalised and padded, as Sam.preprocess makes it).

    Hooks are registered for this call only and always removed. The forward stops right after
    the deepest requested block, so asking for early blocks of a large model is cheap.
    """
    blocks = encoder_blocks(encoder)
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"block index {bad} out of range: this encoder has blocks 0..{len(blocks) - 1}")
    wanted, last, captured = set(indices), max(indices), {}

    def hook(index: int):
        def save(module: nn.Module, args, output: torch.Tensor) -> None:
            captured[index] = channels_last(output, encoder).detach().float().cpu()
            if index == last:
                raise _Enough

        return save

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(wanted)]
    try:
        encoder(image)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
