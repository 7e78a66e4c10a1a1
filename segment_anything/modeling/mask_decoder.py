"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU predictions."""

from typing import List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .transformer import per_prompt


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        """
        Args:
            transformer_dim: channel width of the image embedding and the tokens.
            transformer: the two-way transformer.
            num_multimask_outputs: masks predicted for ambiguous prompts (plus one single mask).
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: (B, C, H, W). Without image_index: batch 1 is shared by all P
                prompts (as in the official decoder), batch P gives prompt i embedding i.
            image_pe: (1, C, H, W) positional encoding of the grid.
            sparse_prompt_embeddings: (P, N, C); dense_prompt_embeddings: (P or 1, C, H, W).
            multimask_output: return the 3 multimask outputs instead of the single mask.
            image_index: (P,) the embedding each prompt reads, which lets a training step decode
                the prompts of many images in one call.
        Returns:
            mask logits (P, 1 or 3, 4H, 4W) and IoU predictions (P, 1 or 3).
        """
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_index, mask_slice
        )
        return masks, iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: Optional[torch.Tensor] = None,
        mask_slice: slice = slice(None),
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The masks of the mask tokens in mask_slice (P, T', 4H, 4W; default all T) and all
        IoU predictions (P, T)."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n_prompts, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)), dim=1)

        if image_index is None:
            if image_embeddings.shape[0] == 1:
                image_index = torch.zeros(n_prompts, dtype=torch.long, device=image_embeddings.device)
            elif image_embeddings.shape[0] != n_prompts:
                raise ValueError(
                    f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 or one per prompt ({n_prompts})"
                )
        dense = dense_prompt_embeddings
        if dense.shape[0] == 1 or dense.stride(0) == 0:
            # One dense embedding for all prompts (no mask input: the prompt encoder expands a
            # single vector): the transformer's first block can share work per image.
            src = image_embeddings + dense[:1]
        else:
            src = per_prompt(image_embeddings, image_index) + dense
            image_index = None
        h, w = src.shape[-2:]
        if torch.is_autocast_enabled(src.device.type):
            # The image rows in the autocast dtype from the start: every product reading them
            # would otherwise cast its own copy (forward and backward), and the residual stream
            # would stay float32 through the additions with low-precision updates.
            low = torch.get_autocast_dtype(src.device.type)
            src, image_pe = src.to(low), image_pe.to(low)

        hs, src = self.transformer(src, image_pe, tokens, image_index=image_index)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in: List[torch.Tensor] = [
            mlp(mask_tokens_out[:, i, :])
            for i, mlp in list(enumerate(self.output_hypernetworks_mlps))[mask_slice]
        ]
        hyper = torch.stack(hyper_in, dim=1)  # P, T', C/8
        return self.upscale_masks(src, hyper, h, w), self.iou_prediction_head(iou_token_out)

    def upscale_masks(self, src: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Image features (P, h * w, C) and hypernetwork outputs (P, T, C/8) -> masks (P, T, 4h, 4w).

        Both transposed convolutions have kernel = stride = 2: each input pixel writes its own
        2x2 output block, i.e. a (C_in -> 4 C_out) matrix product per pixel. Run that way on
        the token layout the transformer returns, the 2x2 offsets stay trailing axes until the
        (P, T) masks are assembled, instead of two channels-first feature maps and their
        convolution kernels (same values; on CPU the convolutions' backward and their GELU's
        had been a third of a warm step's backward time).
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        p = src.shape[0]
        x = F.linear(src, _pixel_weight(up1), up1.bias.repeat(4))  # P, hw, (2 x 2 x C/4)
        x = act1(F.layer_norm(x.unflatten(-1, (4, -1)), (up1.out_channels,), norm.weight, norm.bias, norm.eps))
        x = act2(F.linear(x, _pixel_weight(up2), up2.bias.repeat(4)))  # P, hw, 2x2, (2 x 2 x C/8)
        masks = x.reshape(p, h * w * 16, -1) @ hyper.transpose(1, 2)  # P, (hw 2x2 2x2), T
        # (P, h, w, di, dj, ei, ej, T) -> (P, T, [h di ei], [w dj ej]): row 4i + 2di + ei.
        masks = masks.view(p, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(p, -1, 4 * h, 4 * w)


def _pixel_weight(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """(C_in, C_out, 2, 2) transposed-convolution weight -> (4 C_out, C_in) linear weight whose
    output rows are ordered (di, dj, c_out)."""
    return conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.in_channels)


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
