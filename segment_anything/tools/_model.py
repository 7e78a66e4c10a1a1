"""Model flags shared by the predict, evaluate and export_onnx tools: build a SAM from the
official weights (or seeded random weights) and put a fine-tuned best.pth on top of it."""

import argparse
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..build_sam import MODEL_TYPES, image_size_errors, sam_model_registry
from ..modeling import Sam
from ..utils.data.prepare import DEFAULT_SEED
from ..utils.image_spec import ImageSpec, from_arguments, with_recorded
from ..utils.save_weight import load_partial_weight, read_weights_file, recorded_image_flags
from ..utils.weights import check_checkpoint, inspect_weights



def add_model_args(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    parser.add_argument("--model_type", "--model-type", default="vit_t", choices=MODEL_TYPES)
    parser.add_argument("--checkpoint", required=True,
                        help="official SAM weights; 'none' = the seeded random model a '--checkpoint none' run starts from")
    if weights:
        parser.add_argument("--weights", default=None,
                            help="fine-tuned partial weights (a run's best.pth, or its last.pth) loaded on top")
    parser.add_argument("--image_size", type=int, default=None,
                        help="encoder input side; default: the size recorded in --weights, else 1024")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the random model with --checkpoint none")
    parser.add_argument("--attention", choices=["standard", "fft"], default=None,
                        help="image encoder token mixing; default: what --weights was trained with, else standard")
    parser.add_argument("--fft_blocks", default=None,
                        help="with --attention fft: global, all or block indices; default: --weights', else global")
    parser.add_argument("--device", default="cpu")


def check_weights(path: Optional[str]) -> None:
    """--weights must be a best.pth, a run's last.pth or a state dict; one line naming the file
    and what it holds otherwise (a file that contains code is refused unread)."""
    if path is None:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"--weights {path} not found")
    info = inspect_weights(path)
    if info.kind not in ("partial", "resume", "full"):
        raise ValueError(f"--weights {path} is {info.describe()}; expected a best.pth (or last.pth) written by run.py")


def weights_metadata(path: Optional[str]) -> Dict[str, Any]:
    """The metadata of a partial-weight file or a run's last.pth ({} for a flat state dict or no file)."""
    if path is None:
        return {}
    check_weights(path)
    return read_weights_file(path)[1]


def image_spec_as_trained(args: argparse.Namespace, weights: Optional[str]) -> ImageSpec:
    """How to read images: the image flags given, the others as the weights' run read its images
    (best.pth records it), else training's defaults. Says so when that is not the default."""
    notes = with_recorded(args, recorded_image_flags(weights_metadata(weights)))
    if notes:
        print(f"reading images as {weights} was trained: {', '.join(notes)} (give the flag to override)")
    return from_arguments(args)


def check_base(checkpoint: str, model_type: str, image_size: int) -> None:
    """--checkpoint: 'none', or the full official state dict of model_type (run.py's preflight check);
    --image_size: a positive multiple of the patch size."""
    problems = image_size_errors(image_size)
    if problems:
        raise ValueError(problems[0])
    if checkpoint.lower() != "none":
        check_checkpoint(checkpoint, model_type, image_size)


def build_base(model_type: str, checkpoint: str, image_size: int, seed: int = DEFAULT_SEED, **encoder: str) -> Sam:
    """The starting model: official weights, or with 'none' the seeded random initialisation.
    encoder: attention= and fft_blocks= for the builder (FFT token mixing)."""
    if checkpoint.lower() == "none":
        torch.manual_seed(seed)  # run.py seeds before it builds, so this is the same model
        return sam_model_registry[model_type](checkpoint=None, image_size=image_size, **encoder)
    return sam_model_registry[model_type](checkpoint=checkpoint, image_size=image_size, **encoder)


def encoder_options(args: argparse.Namespace, meta: Dict[str, Any]) -> Dict[str, str]:
    """attention / fft_blocks: the flags when given, else what the weights were trained with
    (load_partial_weight warns when they differ)."""
    stored = meta.get("attention") or {}
    attention = getattr(args, "attention", None) or stored.get("type") or "standard"
    blocks = getattr(args, "fft_blocks", None)
    if blocks is None:
        blocks = ",".join(map(str, stored["blocks"])) if stored.get("blocks") else "global"
    return {"attention": attention, "fft_blocks": blocks} if attention != "standard" else {}


def load_model(args: argparse.Namespace, weights: Optional[str] = None) -> Sam:
    """Base model plus ``weights`` (through load_partial_weight's checks: a file made for another
    model type is an error naming the keys), in eval mode on args.device."""
    meta = weights_metadata(weights)
    if meta.get("task") == "semantic":  # its head has no place in a promptable SAM
        raise ValueError(f"--weights {weights} is from a --task semantic run: use "
                         f"python -m segment_anything.tools.predict --task semantic")
    image_size = args.image_size or meta.get("image_size") or 1024
    check_base(args.checkpoint, args.model_type, image_size)
    sam = build_base(args.model_type, args.checkpoint, image_size, args.seed, **encoder_options(args, meta))
    if weights is not None:
        load_partial_weight(sam, weights, expected_model_type=args.model_type)
    return sam.to(args.device).eval()
