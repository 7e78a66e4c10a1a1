"""Segment Anything (SAM and MobileSAM's vit_t), with the official state-dict layout, for fine-tuning."""

from .build_sam import (
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_t,
    sam_model_registry,
)
from .automatic_mask_generator import SamAutomaticMaskGenerator
from .predictor import SamPredictor

__all__ = [
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "sam_model_registry",
    "SamPredictor",
    "SamAutomaticMaskGenerator",
]
