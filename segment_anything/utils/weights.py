"""What is in a weights file: tell an official state dict from best.pth, last.pth and files that are no checkpoint.

    info = inspect_weights("sam_vit_b_01ec64.pth")
    info.kind        # "full", "partial", "resume", "truncated", "unsafe" or "not_checkpoint"
    info.model_type  # "vit_b" (from the keys and shapes, or from the file's metadata)
    info.image_size  # 1024 (from the position embedding's grid, or from the metadata; None if unknown)
    info.describe()  # one sentence for error messages

The run.py preflight and the tools use it before a model is built. Model types, widths, depths and
the official files come from build_sam's model table. Every file is read data-only
(save_weight.load_data_only): a file whose pickle would call code is the kind "unsafe", never run.
"""

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Set, Union

import torch

from ..build_sam import OFFICIAL_SIZE, PATCH_SIZE, VIT_CONFIGS, official_weights_hint, sam_model_registry
from .save_weight import UnsafeFileError, load_data_only, strip_prefixes

VIT_WIDTHS = {width: name for name, (width, _, _, _) in VIT_CONFIGS.items()}  # patch_embed.proj.weight's output channels
VIT_DEPTHS = {name: depth for name, (_, depth, _, _) in VIT_CONFIGS.items()}
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
RESUME_KEYS = {"optimizer", "scheduler", "model", "epoch"}  # what marks a last.pth


@dataclass
class WeightsInfo:
    """What a weights file holds. kind: full | partial | resume | truncated | unsafe | not_checkpoint."""

    path: Path
    kind: str
    model_type: Optional[str] = None
    image_size: Optional[int] = None
    parts: Set[str] = field(default_factory=set)  # top-level modules with tensors in the file
    metadata: Dict[str, Any] = field(default_factory=dict)  # best.pth: model_type, image_size, epoch...
    detail: str = ""  # why a file is truncated / not a checkpoint

    def describe(self) -> str:
        typ = f" for {self.model_type}" if self.model_type else ""
        size = f" at {self.image_size} px" if self.image_size else ""
        if self.kind == "full":
            return f"a full SAM state dict{typ}{size} (from its keys and shapes)"
        if self.kind == "partial":
            parts = ", ".join(sorted(self.parts)) or "no tensors"
            return f"partial fine-tuned weights ({parts} only, like best.pth){typ}{size}"
        if self.kind == "resume":
            return f"a resume file (last.pth) of a run.py run{typ}{size}"
        if self.kind == "truncated":
            return f"a truncated or damaged PyTorch file ({self.detail})"
        if self.kind == "unsafe":
            return f"a file that contains code, not only data ({self.detail}); it was not loaded"
        return f"not a PyTorch checkpoint ({self.detail})"


def guess_model_type(state_dict: Dict[str, Any]) -> Optional[str]:
    """vit_t, vit_b, vit_l or vit_h from an image encoder's keys and shapes; None without an encoder."""
    keys = strip_prefixes(state_dict)
    if any(k.startswith("image_encoder.layers.") for k in keys):
        return "vit_t"  # TinyViT has stages ("layers"); the ViTs have "blocks"
    proj = keys.get("image_encoder.patch_embed.proj.weight")
    if proj is None:
        return None
    name = VIT_WIDTHS.get(int(proj.shape[0]))
    depth = len({k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")})
    return name if name and VIT_DEPTHS[name] == depth else f"unknown ViT (width {proj.shape[0]}, {depth} blocks)"


def guess_image_size(state_dict: Dict[str, Any]) -> Optional[int]:
    """Input side in pixels from a ViT's position embedding (1, g, g, C); None for TinyViT (no such tensor)."""
    pos = strip_prefixes(state_dict).get("image_encoder.pos_embed")
    return int(pos.shape[1]) * PATCH_SIZE if pos is not None and pos.dim() == 4 else None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_state_dict(path: Path, weights: Dict[str, torch.Tensor], metadata: Dict[str, Any], kind: str) -> WeightsInfo:
    parts = {k.split(".")[0] for k in strip_prefixes(weights)}
    if kind == "auto":
        kind = "full" if set(PARTS) <= parts else "partial"
    model_type = guess_model_type(weights) or metadata.get("model_type")
    image_size = guess_image_size(weights) or metadata.get("image_size")
    return WeightsInfo(path, kind, model_type, image_size, parts, metadata)


def inspect_weights(path: Union[str, Path]) -> WeightsInfo:
    """Read a weights file (memory-mapped when possible: a vit_h file is 2.5 GB) and tell what it is.

    Raises FileNotFoundError if path is not a file; every other problem is a kind, not an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not is_zip and head.startswith(b"PK"):
        return WeightsInfo(path, "truncated", detail="a zip archive without its end (an interrupted copy or download?)")
    try:
        obj = load_data_only(path, mmap=is_zip)
    except UnsafeFileError as err:
        calls = str(err).split("(its pickle calls ", 1)[-1].split(")", 1)[0]
        return WeightsInfo(path, "unsafe", detail=f"its pickle calls {calls}")
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        if is_zip:
            return WeightsInfo(path, "truncated", detail=_first_line(err))
        if head[:1] == b"\x80":  # a pickle protocol header: an old-style torch.save file cut short
            return WeightsInfo(path, "truncated", detail=_first_line(err))
        return WeightsInfo(path, "not_checkpoint", detail=f"neither torch.save's zip format nor a pickle; it starts with {head!r}")
    if isinstance(obj, dict) and _is_tensor_dict(obj.get("model")):
        meta = {k: v for k, v in obj.items() if k != "model"}
        if RESUME_KEYS <= set(obj):
            args = obj.get("args") or {}
            info = _from_state_dict(path, obj["model"], {"epoch": obj.get("epoch"), "args": args}, "resume")
            info.model_type = args.get("model_type", info.model_type)
            info.image_size = args.get("image_size", info.image_size)
            return info
        return _from_state_dict(path, obj["model"], meta, "partial")
    if _is_tensor_dict(obj):
        return _from_state_dict(path, obj, {}, "auto")
    return WeightsInfo(path, "not_checkpoint", detail=f"it holds a {type(obj).__name__}, not a state dict")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


_SHOWN = 5  # keys listed per kind in an error message


def check_checkpoint(path: Union[str, Path], model_type: str, image_size: int) -> WeightsInfo:
    """The --checkpoint preflight: the file must be a full state dict of model_type usable at image_size.

    Raises FileNotFoundError (with where the official file is published) or ValueError saying what the
    file holds and what was expected; returns the WeightsInfo when the file fits.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} not found. {official_weights_hint(model_type)}; "
                                "--checkpoint none starts from random weights")
    info = inspect_weights(path)
    found = f"--checkpoint {path} is {info.describe()}"
    expected = f"expected the full {model_type} state dict ({official_weights_hint(model_type).lower() or 'a SAM state dict'})"
    if info.kind == "partial":
        raise ValueError(f"{found}; {expected}. A best.pth goes on top of those: load_model_ex.py --weights, "
                         "or segment_anything.utils.save_weight.load_partial_weight")
    if info.kind == "resume":
        raise ValueError(f"{found}; {expected}. Its trained parameters go on top of those with --weights {path}; "
                         f"to continue that run: run.py --resume {path}")
    if info.kind == "unsafe":
        raise ValueError(found)
    if info.kind != "full":
        raise ValueError(f"{found}; {expected}")
    if info.model_type != model_type:
        raise ValueError(f"--checkpoint {path} holds {info.model_type} weights (from its keys and shapes), "
                         f"but --model_type is {model_type}; pass --model_type {info.model_type} or the {model_type} weights")
    if info.image_size not in (None, OFFICIAL_SIZE, image_size):
        raise ValueError(f"--checkpoint {path} holds {model_type} weights for {info.image_size}-px inputs "
                         f"(position embedding {info.image_size // PATCH_SIZE}x{info.image_size // PATCH_SIZE}), but "
                         f"--image_size is {image_size}; only the official {OFFICIAL_SIZE}-px weights are adapted to "
                         f"other sizes: pass --image_size {info.image_size}")
    _check_keys(path, model_type, image_size)
    return info


def _check_keys(path: Path, model_type: str, image_size: int) -> None:
    """Every key of the model in the file and no other, with the model's shapes (up to the tensors
    that build_sam interpolates to the input size)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        target = {k: v.shape for k, v in sam_model_registry[model_type](image_size=image_size).state_dict().items()}
    found = {k: v.shape for k, v in torch.load(path, map_location="meta", weights_only=True).items()}
    resized = ("image_encoder.pos_embed", "attn.rel_pos_h", "attn.rel_pos_w")
    missing = sorted(set(target) - set(found))
    unknown = sorted(set(found) - set(target))
    wrong = sorted(f"{k}: file {tuple(found[k])} vs model {tuple(target[k])}" for k in set(found) & set(target)
                   if found[k] != target[k] and not k.endswith(resized))
    if missing or unknown or wrong:
        lists = [(title, keys) for title, keys in (("missing", missing), ("unexpected", unknown), ("other shape", wrong)) if keys]
        text = "; ".join(f"{len(keys)} {title} (e.g. {', '.join(keys[:_SHOWN])})" for title, keys in lists)
        raise ValueError(f"--checkpoint {path} does not fit {model_type} at {image_size} px: {text}")
