"""Builders for SAM models: one shared assembly, one encoder factory per model type."""

from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from .modeling.fft_attention import ATTENTIONS, parse_fft_blocks, use_fft_attention
from .modeling.image_encoder import resize_rel_pos
from .modeling.tiny_vit import TinyViT

PROMPT_EMBED_DIM = 256
PATCH_SIZE = 16  # every encoder here outputs an img_size / 16 grid
OFFICIAL_SIZE = 1024  # the input side of the published weights

# The model table: every model type, its published weights file and where it is published, and
# (below) the encoder each is built with. Config choices, weights inspection, the tools and the
# benchmarks read it from here.
MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t")
OFFICIAL_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_t": "mobile_sam.pt",
}
OFFICIAL_WEIGHTS = {
    **{name: f"https://dl.fbaipublicfiles.com/segment_anything/{OFFICIAL_FILES[name]}" for name in ("vit_h", "vit_l", "vit_b")},
    "vit_t": f"https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/{OFFICIAL_FILES['vit_t']}",
}

PathLike = Union[str, Path]


def image_size_errors(image_size: int) -> List[str]:
    """The --image_size flag's problem, if any (run.py and every tool say it alike)."""
    if image_size < PATCH_SIZE or image_size % PATCH_SIZE:
        return [f"--image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}"]
    return []


def _vit_encoder(embed_dim: int, depth: int, num_heads: int, global_attn_indexes, image_size: int) -> nn.Module:
    return ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn_indexes,
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
    )


# MobileSAM's TinyViT-5M configuration for vit_t.
VIT_T_CONFIG = dict(
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


def _tiny_vit_encoder(image_size: int) -> nn.Module:
    return TinyViT(img_size=image_size, in_chans=3, num_classes=1000, **VIT_T_CONFIG)


# (width, depth, heads, global-attention blocks) of the ViT encoders.
VIT_CONFIGS = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}
ENCODERS: Dict[str, Callable[[int], nn.Module]] = {
    **{name: partial(_vit_encoder, *config) for name, config in VIT_CONFIGS.items()},
    "vit_t": _tiny_vit_encoder,
}


def fft_blocks_for(model_type: str, fft_blocks: str = "global") -> Tuple[int, ...]:
    """The encoder blocks --attention fft replaces; ValueError for vit_t or a bad --fft_blocks.

    vit_t is refused: TinyViT has no global attention, only 7x7 and 14x14 windows (49-196
    tokens), where an N log N mixer has nothing to save and its attention biases have no place."""
    if model_type not in VIT_CONFIGS:
        raise ValueError(f"--attention fft needs a ViT encoder (vit_b, vit_l, vit_h); {model_type}'s TinyViT "
                         "has only windowed attention, where FFT mixing saves nothing")
    _, depth, _, global_blocks = VIT_CONFIGS[model_type]
    return parse_fft_blocks(fft_blocks, depth, global_blocks)


def _build_sam(model_type: str, checkpoint: Optional[PathLike] = None, image_size: int = 1024,
               attention: str = "standard", fft_blocks: str = "global") -> Sam:
    """Assemble a SAM whose encoder takes image_size x image_size inputs and load a checkpoint.

    A checkpoint made at another resolution (the official ones are 1024) is adapted by
    checkpoint_filter_fn: position embeddings are interpolated to the new grid.
    attention="fft" mixes tokens by FFT in the blocks fft_blocks names (modeling/fft_attention.py);
    the state-dict keys stay the stock ones, so the same checkpoints load.
    """
    if image_size % PATCH_SIZE != 0:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    grid = image_size // PATCH_SIZE
    image_encoder = ENCODERS[model_type](image_size)
    if attention == "fft":
        use_fft_attention(image_encoder, fft_blocks_for(model_type, fft_blocks))
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    sam.eval()
    if checkpoint is not None:
        state_dict = load_checkpoint_file(checkpoint, model_type)
        sam.load_state_dict(checkpoint_filter_fn(state_dict, sam), strict=True)
    return sam


def official_weights_hint(model_type: str) -> str:
    """The sentence that tells where a model type's official weights are published."""
    if model_type not in OFFICIAL_WEIGHTS:
        return ""
    return f"The official {model_type} weights are published at {OFFICIAL_WEIGHTS[model_type]}"


def load_checkpoint_file(path: PathLike, model_type: str = "") -> Dict[str, torch.Tensor]:
    """Read an official-format checkpoint (a flat state dict) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}. {official_weights_hint(model_type)}".rstrip())
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Sam) -> Dict[str, torch.Tensor]:
    """Adapt a state dict to model's input size: the only place where checkpoint tensors are reshaped.

    - ``image_encoder.pos_embed`` (1, g, g, C) is bicubically resized to the model's grid;
    - ``...attn.rel_pos_{h,w}`` tables of global-attention blocks are linearly resized, the
      same interpolation the encoder applies to a mismatched table at run time.
    Everything else must already match; load_state_dict(strict=True) reports what does not.
    """
    target = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key == "image_encoder.pos_embed":
            resized = F.interpolate(
                value.permute(0, 3, 1, 2).float(), size=tuple(want[1:3]), mode="bicubic", align_corners=False
            )
            out[key] = resized.permute(0, 2, 3, 1).to(value.dtype)
        elif key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and value.shape[1] == want[1]:
            out[key] = resize_rel_pos(value.float(), want[0]).to(value.dtype)
    return out


def build_sam_vit_h(checkpoint: Optional[PathLike] = None, image_size: int = 1024,
                    attention: str = "standard", fft_blocks: str = "global") -> Sam:
    return _build_sam("vit_h", checkpoint, image_size, attention, fft_blocks)


def build_sam_vit_l(checkpoint: Optional[PathLike] = None, image_size: int = 1024,
                    attention: str = "standard", fft_blocks: str = "global") -> Sam:
    return _build_sam("vit_l", checkpoint, image_size, attention, fft_blocks)


def build_sam_vit_b(checkpoint: Optional[PathLike] = None, image_size: int = 1024,
                    attention: str = "standard", fft_blocks: str = "global") -> Sam:
    return _build_sam("vit_b", checkpoint, image_size, attention, fft_blocks)


def build_sam_vit_t(checkpoint: Optional[PathLike] = None, image_size: int = 1024,
                    attention: str = "standard", fft_blocks: str = "global") -> Sam:
    return _build_sam("vit_t", checkpoint, image_size, attention, fft_blocks)


build_sam = build_sam_vit_h

sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}
