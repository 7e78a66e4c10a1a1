"""The prompt encoder + mask decoder as one traceable module, with the inputs and outputs of the
decoder that Meta's ``scripts/export_onnx_model.py`` exports (so web and C++ front ends that
run SAM's ONNX decoder accept ours). SamOnnxModel takes Meta's constructor arguments.

Inputs (batch 1; N points may vary between calls):
    image_embeddings  (1, 256, g, g) float   the image encoder's output (g = image_size / 16)
    point_coords      (1, N, 2) float        xy in the resized frame (longest side = image_size)
    point_labels      (1, N) float           1 fg, 0 bg, 2 box top-left, 3 box bottom-right, -1 padding
    mask_input        (1, 1, 4g, 4g) float   previous low-res logits
    has_mask_input    (1,) float             1 to use mask_input, 0 to ignore it
    orig_im_size      (2,) float             (H, W) of the original image
Outputs:
    masks             (1, M, H, W) logits at the original size (M = 1 with return_single_mask, else 4)
    iou_predictions   (1, M)
    low_res_masks     (1, M, 4g, 4g) logits

As in SAM's export, no padding point is added here: a caller without a box appends a point
(0, 0) with label -1.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .amg import calculate_stability_score

INPUT_NAMES = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]


class SamOnnxModel(nn.Module):
    """What the ONNX decoder computes; built with Meta's arguments: return_single_mask picks one
    mask per call, use_stability_score scores masks by stability instead of the predicted IoU,
    return_extra_metrics adds each mask's stability score and area (5 outputs)."""

    def __init__(self, model: nn.Module, return_single_mask: bool, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> None:
        super().__init__()
        self.mask_decoder = model.mask_decoder
        self.model = model
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0
        self.return_extra_metrics = return_extra_metrics

    @staticmethod
    def resize_longest_image_size(input_image_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """(H, W) scaled so the longer side is longest_side, rounded half up, as int64."""
        size = input_image_size.to(torch.float32)
        return torch.floor(size * (longest_side / size.max()) + 0.5).to(torch.int64)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(1, N, 2) coords + (1, N) labels -> (1, N, C). Written with masks instead of indexing
        so the label logic becomes plain arithmetic in the graph."""
        prompt_encoder = self.model.prompt_encoder
        pe = prompt_encoder.pe_layer._pe_encoding((coords + 0.5) / self.img_size)
        labels = labels.unsqueeze(-1)
        emb = pe * (labels != -1) + prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for i, embedding in enumerate(prompt_encoder.point_embeddings):
            emb = emb + embedding.weight * (labels == i)
        return emb

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """(1, 1, 4g, 4g) + (1,) -> (1, C, g, g): the mask's embedding or the no-mask embedding."""
        prompt_encoder = self.model.prompt_encoder
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(1, M, 4g, 4g) -> (1, M, H, W): to the padded input frame, drop the padding, to (H, W)."""
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        resized = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : resized[0], : resized[1]]
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

    def select_masks(self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt, as SamPredictor would give: with more than two points (an
        unambiguous prompt) the single-mask output, otherwise the best of the three multimask
        outputs. Done with a score offset instead of control flow so N can vary at run time."""
        offset = torch.zeros_like(iou_preds)
        offset[:, 0] = 1000.0
        best = torch.argmax(iou_preds + (num_points - 2.5) * offset, dim=1)
        rows = torch.arange(masks.shape[0])
        return masks[rows, best].unsqueeze(1), iou_preds[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_mask(mask_input, has_mask_input)
        low_res, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        threshold = self.model.mask_threshold
        if self.use_stability_score:
            scores = calculate_stability_score(low_res, threshold, self.stability_score_offset)
        if self.return_single_mask:
            low_res, scores = self.select_masks(low_res, scores, point_coords.shape[1])
        masks = self.mask_postprocessing(low_res, orig_im_size)
        if self.return_extra_metrics:
            stability = calculate_stability_score(masks, threshold, self.stability_score_offset)
            areas = (masks > threshold).sum(-1).sum(-1)
            return masks, scores, stability, areas, low_res
        return masks, scores, low_res


def dummy_inputs(model: nn.Module, num_points: int = 5) -> Tuple[torch.Tensor, ...]:
    """Example inputs in the order of INPUT_NAMES, for tracing."""
    grid = model.prompt_encoder.image_embedding_size
    embed_dim = model.prompt_encoder.embed_dim
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, embed_dim, *grid, generator=gen),
        torch.randint(0, model.image_encoder.img_size, (1, num_points, 2), generator=gen).float(),
        torch.randint(0, 4, (1, num_points), generator=gen).float(),
        torch.randn(1, 1, 4 * grid[0], 4 * grid[1], generator=gen),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )
