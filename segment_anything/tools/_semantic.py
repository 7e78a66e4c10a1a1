"""predict --task semantic: class maps from a semantic run's best.pth (head + class names).

Per image it writes <stem>_labels.png (the class map in colour: class c is PALETTE colour c,
background black), <stem>_classes.png (the class ids themselves, 8-bit, or 16-bit above 255
classes) and <stem>_overlay.png (the colours over the image)."""

import argparse
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
import torch

from ..modeling import Sam
from ..modeling.semantic_head import attach_head, upsample_logits
from ..utils import draw
from ..utils.save_weight import load_partial_weight
from ..utils.transforms import ResizeLongestSide
from ._model import build_base, check_base, weights_metadata


def palette(k: int) -> np.ndarray:
    """(K, 3) uint8 RGB: class 0 (background) black, the others draw.colours(K - 1)."""
    return np.concatenate([np.zeros((1, 3), np.uint8), draw.colours(max(k - 1, 1))[: k - 1]])


def load_semantic_model(args: argparse.Namespace) -> Tuple[Sam, List[str]]:
    """Base model + a head sized from --weights' class list + the file's tensors, in eval mode."""
    if not args.weights:
        raise ValueError("--task semantic needs --weights: the best.pth of a --task semantic run (head and class names)")
    meta = weights_metadata(args.weights)
    if meta.get("task") != "semantic" or not meta.get("classes"):
        raise ValueError(f"--weights {args.weights} is not from a --task semantic run (no class names in its metadata)")
    image_size = args.image_size or meta.get("image_size") or 1024
    check_base(args.checkpoint, args.model_type, image_size)
    sam = build_base(args.model_type, args.checkpoint, image_size, args.seed)
    attach_head(sam, len(meta["classes"]))
    load_partial_weight(sam, args.weights, expected_model_type=args.model_type)
    return sam.to(args.device).eval(), list(meta["classes"])


@torch.no_grad()
def predict_classes(sam: Sam, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> int64 (H, W) class ids (argmax of the head's logits at the original size)."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = transform.apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).float()
    logits = sam.semantic_head(sam.image_encoder(sam.preprocess(x)[None]))
    return upsample_logits(logits, resized.shape[:2], image.shape[:2])[0].argmax(0).cpu().numpy()


def write_semantic(out_dir: Path, stem: str, image: np.ndarray, classes: np.ndarray, k: int) -> None:
    colours = palette(k)
    draw.save_rgb(out_dir / f"{stem}_labels.png", colours[classes])
    cv2.imwrite(str(out_dir / f"{stem}_classes.png"), classes.astype(np.uint8 if k <= 256 else np.uint16))
    masks = [classes == c for c in range(1, k)]
    draw.save_rgb(out_dir / f"{stem}_overlay.png", draw.overlay(image, masks, colours[1:]))
