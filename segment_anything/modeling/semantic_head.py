"""A K-class segmentation head on SAM's image-encoder features (--task semantic).

The encoder's neck output (C, g, g) with g = image_size / 16 goes through log2(16) = 4 blocks of
(3x3 conv, BatchNorm, ReLU, 2x bilinear upsampling), halving the channels each time, and a 1x1
conv to K class logits at the encoder's input resolution (image_size, image_size). The module is
attached to Sam as ``sam.semantic_head``: its state-dict keys all start with ``semantic_head.``
and collide with no stock SAM key.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

KEY_PREFIX = "semantic_head."


class UpBlock(nn.Sequential):
    """(B, c_in, h, w) -> (B, c_out, 2h, 2w)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # no bias: BatchNorm's shift replaces it
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )


class SemanticHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 256, upscale: int = 16, min_channels: int = 16) -> None:
        """num_classes K >= 2 (class 0 is background); upscale: input side / embedding side (a power of 2)."""
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a semantic head needs >= 2 classes (background and one more), got {num_classes}")
        stages = int(round(math.log2(upscale)))
        if 2**stages != upscale:
            raise ValueError(f"upscale must be a power of 2, got {upscale}")
        self.num_classes = num_classes
        blocks, c = [], in_channels
        for _ in range(stages):
            blocks.append(UpBlock(c, max(c // 2, min_channels)))
            c = max(c // 2, min_channels)
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) image embeddings -> (B, K, 16 g, 16 g) class logits (the padded input frame)."""
        return self.classifier(self.blocks(embeddings))


def attach_head(sam: nn.Module, num_classes: int) -> SemanticHead:
    """Give sam a fresh head sized for its encoder (its input side / 16 embedding grid)."""
    encoder = sam.image_encoder
    channels = sam.prompt_encoder.embed_dim
    grid = sam.prompt_encoder.image_embedding_size[0]
    head = SemanticHead(num_classes, channels, encoder.img_size // grid)
    sam.semantic_head = head.to(next(sam.parameters()).device)
    return head


def upsample_logits(logits: torch.Tensor, input_size, original_size) -> torch.Tensor:
    """(B, K, S, S) padded-frame logits -> (B, K, H, W): the valid (h, w) corner, resized to the
    original image size (what Sam.postprocess_masks does for mask logits)."""
    h, w = input_size
    return F.interpolate(logits[..., :h, :w], size=tuple(original_size), mode="bilinear", align_corners=False)
