"""Save and load the fine-tuned part of a SAM model ("partial weights").

A fine-tune of the mask decoder changes ~4 M of SAM's 10-640 M parameters (vit_t to vit_h), so only the trained
tensors are stored; they are loaded on top of an official checkpoint. File layout::

    {"format": "sam-partial-v1", "model": {state-dict key: tensor}, **metadata}

with keys exactly as in the official state dict (``mask_decoder.transformer.layers.0.norm1.weight``)
and metadata of plain Python values (model_type, image_size, epoch, metrics, args), so the file
loads with ``torch.load(..., weights_only=True)``.

This module depends only on torch, numpy and the standard library (build_sam's checkpoint_filter_fn
when it is there): load_model_ex.py loads it by file path next to Meta's stock ``segment_anything``,
which has no such module. ``model_spec`` reads from a file's metadata how to build the model it goes on.
"""

import inspect
import io
import logging
import os
import pickle
import uuid
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

try:  # absent when load_model_ex.py loads this file beside Meta's package
    from ..build_sam import checkpoint_filter_fn
except ImportError:
    checkpoint_filter_fn = None

FORMAT = "sam-partial-v1"
# Prefixes that wrappers add to every key: DDP / DataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 10  # keys listed per kind in an error message

PathLike = Union[str, Path]

# Resume files written before the weights-only format held numpy RNG states: numpy arrays and
# scalars, rebuilt from their dtype and raw bytes. These globals build data and call nothing else,
# so such a file still loads without running code; any other global in a file is refused.
NUMPY_ARRAY_GLOBALS = {
    "numpy._core.multiarray._reconstruct": np._core.multiarray._reconstruct,
    "numpy._core.multiarray.scalar": np._core.multiarray.scalar,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
}
# The dtype classes such arrays and scalars are built with (numeric kinds only).
NUMPY_DTYPE_CLASSES = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                                   np.uint32, np.uint64, np.float16, np.float32, np.float64)]


class UnsafeFileError(ValueError):
    """A file whose pickle would call code (a function or class that builds no plain data)."""


def load_data_only(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, and nothing looser: tensors, numbers, strings,
    lists, tuples and dicts (plus numpy arrays, see NUMPY_ARRAY_GLOBALS).

    A file that would run code raises UnsafeFileError naming what it calls; the file's code is
    never executed (its pickle is read as instructions, not run). Other damage raises what
    torch.load raises."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):
            raise
        called = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        code = sorted(set(called) - set(NUMPY_ARRAY_GLOBALS))
        if code:
            raise UnsafeFileError(
                f"{path} contains code, not only data (its pickle calls {', '.join(code)}); it was not loaded. "
                "Weights and run files hold tensors and plain values only: get the file again from its source, "
                "or ask its author to save it with this version") from None
        if not called:
            raise
        with torch.serialization.safe_globals(list(NUMPY_ARRAY_GLOBALS.values()) + NUMPY_DTYPE_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside any DDP / DataParallel / torch.compile wrappers, nested in any order."""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # torch.compile's OptimizedModule; duck-typed so torch._dynamo is never imported here.
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Keys without leading wrapper prefixes (``module.``, ``_orig_mod.``, repeated in any order).

    The only place where key names are rewritten. A key that does not start with a prefix is kept
    as is: slicing ``key[7:]`` unconditionally would turn ``mask_decoder.x`` into ``coder.x``.
    """
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name[len(next(p for p in WRAPPER_PREFIXES if name.startswith(p))):]
        if name in out:
            # Both "module.x" and "x": silently keeping one would load the wrong tensor.
            raise ValueError(f"state dict holds {key!r} and another key that also means {name!r}")
        out[name] = value
    return out


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State-dict entries of the parameters with requires_grad=True, detached CPU copies.

    Keys are those of the unwrapped model, so a file saved from a DDP or compiled model has the
    same keys as one saved from the plain model.
    """
    entries = unwrap_model(model).state_dict(keep_vars=True)  # keep_vars: Parameters, to see requires_grad
    return {
        key: value.detach().to("cpu", copy=True)
        for key, value in entries.items()
        if isinstance(value, nn.Parameter) and value.requires_grad
    }


def _select(model: nn.Module, keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """State-dict entries (parameters and buffers) under the given key prefixes, CPU copies."""
    prefixes = [keys] if isinstance(keys, str) else list(keys)
    entries = unwrap_model(model).state_dict()
    out: Dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        base = prefix.rstrip(".")
        # A whole name component must match: "mask_decoder" must not select "mask_decoder_x.w".
        found = {k: v for k, v in entries.items() if k == base or k.startswith(base + ".")}
        if not found:
            raise ValueError(f"no state-dict key of the model starts with {prefix!r}")
        out.update({k: v.detach().to("cpu", copy=True) for k, v in found.items()})
    return out


def _check_weights_only(metadata: Dict[str, Any]) -> None:
    """Fail before writing if the metadata would make the file unloadable with weights_only=True.

    Round-trips through torch's own restricted unpickler, so the accepted types are exactly
    torch's (a pathlib.Path or argparse.Namespace in the args is the usual offender).
    """
    buffer = io.BytesIO()
    torch.save(metadata, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, whose wording varies between versions
        raise TypeError(
            "metadata must hold only plain Python values (str, int, float, bool, None, list, tuple, dict) "
            f"so the file loads with torch.load(..., weights_only=True); convert e.g. paths with str(): {err}"
        ) from err


class WriteError(OSError):
    """A file could not be written (disk full, quota, file size limit, read-only, permissions).

    path: the file; reason: the system's words ("No space left on device"); errno as the system's.
    A file that atomic_save or atomic_write_bytes would have replaced is unchanged."""

    def __init__(self, path: PathLike, reason: str, code: Optional[int] = None) -> None:
        super().__init__(code, reason)
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"could not write {self.path}: {self.reason}"


def _os_error_in(err: BaseException) -> Optional[OSError]:
    """The OSError behind err: itself, or one it was raised from or while handling (torch.save
    answers a failed write with a RuntimeError from its zip writer)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def writing(path: PathLike):
    """Turns a failed write of path (an OSError, or torch's RuntimeError over one) into WriteError."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise WriteError(path, cause.strerror or str(cause), cause.errno) from err


def _replace(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """write(file) into a temporary file in path's folder, fsync, then rename over path.

    os.replace is atomic within a file system, so readers see the old file or the new one,
    never a half-written one, and a crash or a full disk while writing leaves the previous file
    intact and no temporary file behind. WriteError when it cannot be written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "xb") as f:  # plain open, not mkstemp: the file gets the usual umask permissions
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:  # make the rename itself durable; not possible on every OS / file system
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to path atomically (see _replace); WriteError when it cannot be written."""
    _replace(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write bytes to path atomically (see _replace); WriteError when it cannot be written."""
    _replace(Path(path), lambda f: f.write(data))


def append_text(path: PathLike, text: str) -> None:
    """Append text to path (a log-like file: a torn last line is the worst a failure leaves);
    WriteError when it cannot be written."""
    with writing(path), open(path, "a") as f:
        f.write(text)


def save_partial_weight(
    model: nn.Module,
    path: PathLike,
    metadata: Optional[Dict[str, Any]] = None,
    keys: Optional[Iterable[str]] = None,
    weights: Optional[Dict[str, torch.Tensor]] = None,
) -> Path:
    """Write the trainable parameters of ``model`` (or the entries under ``keys`` prefixes) to ``path``.

    model: plain or wrapped (DDP, DataParallel, torch.compile); keys never carry wrapper prefixes.
    metadata: plain Python values stored beside the weights (model_type, image_size, epoch, ...).
    keys: state-dict key prefixes such as ["mask_decoder"]; overrides the requires_grad selection
      and may include buffers.
    weights: the tensors to store, already chosen (utils.trainable.export_weights: LoRA merged).
    The write is atomic; parent folders are created. Returns the path.
    """
    metadata = dict(metadata or {})
    reserved = {"format", "model"} & metadata.keys()
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved by the file format")
    _check_weights_only(metadata)
    if weights is None:
        weights = trainable_state_dict(model) if keys is None else _select(model, keys)
    if not weights:
        # Almost always a freezing bug; an empty file would load "successfully" and change nothing.
        raise ValueError("nothing to save: the model has no parameter with requires_grad=True")
    path = Path(path)
    atomic_save({"format": FORMAT, "model": weights, **metadata}, path)
    return path


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


RESUME_PREFIX = "sam-resume-"  # last.pth's format names (training/resume.py writes them)


def _resume_metadata(state: Dict[str, Any]) -> Dict[str, Any]:
    """What best.pth would record beside the same weights, from a resume file's run flags."""
    args = state.get("args") or {}
    meta = {"model_type": args.get("model_type"), "image_size": args.get("image_size"), "epoch": state.get("epoch"),
            "args": args, "resume_file": True}
    meta.update(image_flags(args))
    if args.get("task") == "semantic":
        meta["task"] = "semantic"
    if args.get("attention") == "fft":
        meta["attention"] = {"type": "fft", "blocks": str(args.get("fft_blocks") or "global").split(",")}
    if args.get("lora_rank"):  # last.pth keeps the adapters themselves
        meta["lora"] = {"rank": args["lora_rank"], "alpha": args.get("lora_alpha"),
                        "scaling": args.get("lora_alpha", 1.0) / args["lora_rank"], "save": "adapters"}
    return meta


def _split(obj: Any, path: Path):
    """(state dict, metadata) from our format, a run's last.pth, or a flat state dict."""
    if isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        fmt = obj.get("format", FORMAT)
        if isinstance(fmt, str) and fmt.startswith(RESUME_PREFIX):
            return obj["model"], _resume_metadata(obj)
        if fmt != FORMAT:
            raise ValueError(f"{path}: unsupported format {obj['format']!r} (this code reads {FORMAT!r})")
        return obj["model"], {k: v for k, v in obj.items() if k != "model"}
    if _is_state_dict(obj):
        return obj, {}
    raise ValueError(f"{path} holds neither partial SAM weights nor a state dict (got {type(obj).__name__})")


IMAGE_FLAGS = ("channels", "intensity_range", "plane")  # how training turned a file into SAM's 8-bit RGB


def image_flags(args: Dict[str, Any]) -> Dict[str, Any]:
    """The run flags that say how images were read (--channels, --intensity_range, --plane), for
    best.pth's metadata: whoever uses the weights must read images the same way."""
    return {k: args[k] for k in IMAGE_FLAGS if args.get(k) not in (None, "")}


def recorded_image_flags(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """How the weights' run read its images: best.pth's record, else its run flags ({} when the
    file does not say: training's defaults)."""
    return {**image_flags(metadata.get("args") or {}), **image_flags(metadata)}


def read_weights_file(path: PathLike) -> "tuple[Dict[str, torch.Tensor], Dict[str, Any]]":
    """(tensors, metadata) of a best.pth, a run's last.pth or a flat state dict, loaded data-only.
    Metadata is {} for a flat state dict; for a last.pth it is what best.pth would hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return _split(load_data_only(path), path)


@dataclass
class ModelSpec:
    """How to build the model that a best.pth (or a run's last.pth) goes on top of."""

    model_type: str
    image_size: int
    build: Dict[str, Any]  # the builder's keyword arguments besides checkpoint (image_size, attention, fft_blocks)
    image_flags: Dict[str, Any]  # how the run read its images (recorded_image_flags)
    seed: Optional[int]  # the run's --seed (a --checkpoint none run starts from the model it seeds); None: not recorded
    notes: List[str] = field(default_factory=list)  # lines worth printing


def model_spec(path: PathLike, builders: Dict[str, Callable[..., nn.Module]], model_type: Optional[str] = None,
               image_size: Optional[int] = None) -> ModelSpec:
    """The ModelSpec of a weights file, from its metadata, for the flags --model_type / --image_size
    (None: the file's; given, they must agree with it).

    builders: a sam_model_registry, ours or Meta's; Meta's builders take neither image_size nor
    attention, so a file trained at another size or with FFT token mixing is refused, saying so.
    FileNotFoundError / ValueError: one line naming the flag and the file."""
    path = Path(path)
    try:
        _, meta = read_weights_file(path)
    except (FileNotFoundError, UnsafeFileError) as err:
        raise type(err)(f"--weights {err}") from None
    except ValueError as err:
        raise ValueError(f"--weights {err}; expected a best.pth written by run.py") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        with open(path, "rb") as f:
            head = f.read(4)
        what = (f"a truncated or damaged PyTorch file ({(str(err).strip().splitlines() or [type(err).__name__])[0][:200]})"
                if head.startswith(b"PK") or head[:1] == b"\x80"  # torch.save's zip, or an old-style pickle
                else f"not a PyTorch checkpoint (neither torch.save's zip format nor a pickle; it starts with {head!r})")
        raise ValueError(f"--weights {path} is {what}; expected a best.pth written by run.py") from None

    def pick(flag: str, given: Any, fallback: Any = None) -> Any:
        stored = meta.get(flag)
        if given is not None and stored is not None and given != stored:
            raise ValueError(f"--{flag} {given}, but {path} was trained with {flag} {stored}; "
                             f"leave --{flag} out to use the file's")
        value = given if given is not None else stored if stored is not None else fallback
        if value is None:
            raise ValueError(f"{path} does not say which {flag} it was trained for; pass --{flag}")
        return value

    model_type, image_size = pick("model_type", model_type), pick("image_size", image_size, fallback=1024)
    if model_type not in builders:
        raise ValueError(f"{path} is for {model_type}, which this segment_anything does not have")
    accepts = inspect.signature(builders[model_type]).parameters
    mixing = meta.get("attention") or {}
    build = {"attention": "fft", "fft_blocks": ",".join(map(str, mixing["blocks"]))} if mixing.get("type") == "fft" else {}
    if build and "attention" not in accepts:
        raise ValueError(f"{path} was trained with FFT token mixing in encoder blocks {mixing['blocks']}; this "
                         "segment_anything (Meta's) has only standard attention: use this repository's package")
    if "image_size" in accepts:
        build["image_size"] = image_size  # the official weights are adapted to the size
    elif image_size != 1024:
        raise ValueError(f"{path} was trained at image_size {image_size}; this segment_anything (Meta's) runs "
                         "only at 1024: use this repository's package")
    notes = [f"note: {path} is a run's resume file (last.pth, after epoch {meta.get('epoch')}); using the "
             "parameters it holds (best.pth holds the best epoch's)"] if meta.get("resume_file") else []
    seed = (meta.get("args") or {}).get("seed")
    return ModelSpec(model_type, image_size, build, recorded_image_flags(meta), seed, notes)


def _listing(title: str, lines: list) -> str:
    more = f"\n    ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return f"\n  {title} ({len(lines)}):\n    " + "\n    ".join(lines[:_SHOWN]) + more


SIZE_DEPENDENT = ("image_encoder.pos_embed", "attn.rel_pos_h", "attn.rel_pos_w")


def _merge_adapters(weights: Dict[str, torch.Tensor], targets: Dict[str, Any], metadata: Dict[str, Any],
                    path: Path) -> Dict[str, torch.Tensor]:
    """LoRA adapter pairs (``X.lora_A`` (r, in), ``X.lora_B`` (out, r)) that the model has no
    slot for become ``X.weight = model's X.weight + scaling * B @ A``: the model must hold the
    base weights the adapters were trained on (the same official checkpoint)."""
    names = [k[: -len(".lora_A")] for k in weights if k.endswith(".lora_A") and k not in targets]
    if not names:
        return weights
    scaling = (metadata.get("lora") or {}).get("scaling")
    if scaling is None:
        raise ValueError(f"{path} holds LoRA adapters but no 'lora' metadata with their scaling")
    adapter_keys = {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    out = {k: v for k, v in weights.items() if k not in adapter_keys}
    for name in names:
        if f"{name}.lora_B" not in weights or f"{name}.weight" not in targets:
            raise ValueError(f"{path}: adapter {name} has no lora_B, or the model has no {name}.weight")
        base = targets[f"{name}.weight"].detach()
        delta = weights[f"{name}.lora_B"].float() @ weights[f"{name}.lora_A"].float() * scaling
        out[f"{name}.weight"] = (base.float().cpu() + delta).to(base.dtype)
    return out


def _resize_size_dependent(weights: Dict[str, torch.Tensor], targets: Dict[str, Any], model: nn.Module,
                           metadata: Dict[str, Any], path: Path) -> Dict[str, torch.Tensor]:
    """Position embedding and relative-position tables trained at another image_size, resized
    to the model's by build_sam.checkpoint_filter_fn (the one place that reshapes checkpoints)."""
    resize = {k: v for k, v in weights.items()
              if k.endswith(SIZE_DEPENDENT) and k in targets and v.shape != targets[k].shape}
    if not resize:
        return weights
    if checkpoint_filter_fn is None:  # loaded beside Meta's package (load_model_ex.py)
        raise ValueError(
            f"{path} was trained at image_size {metadata.get('image_size')} and holds the encoder's position "
            f"tables ({', '.join(sorted(resize))}), which must be interpolated to this model's size; "
            "that needs this project's segment_anything (build_sam.checkpoint_filter_fn)")
    resized = checkpoint_filter_fn(resize, model)
    logging.getLogger("sam_finetune").info(  # utils.log's logger name; this module must not import it
        "%s: %d position table(s) interpolated from image_size %s to the model's %s", path, len(resize),
        metadata.get("image_size"), getattr(getattr(model, "image_encoder", None), "img_size", "?"))
    return {**weights, **resized}


def load_partial_weight(
    model: nn.Module,
    path: PathLike,
    strict: bool = True,
    expected_model_type: Optional[str] = None,
) -> Dict[str, Any]:
    """Copy the tensors of a partial-weight file into ``model`` in place; return the file's metadata.

    model: any nn.Module with the official key layout (ours or Meta's Sam), plain or wrapped.
    path: a file from save_partial_weight, or a flat state dict (keys may carry ``module.`` /
      ``_orig_mod.``).
    strict: every key of the file must exist in the model with the same shape, else ValueError.
      With strict=False such keys are skipped, but a file of which nothing fits still raises.
    expected_model_type: if given and the file records another model_type, ValueError: a decoder
      tuned on vit_h embeddings has vit_b's shapes but is wrong for vit_b.
    Returns every entry of the file except "model" ({} for a flat state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"partial weight file not found: {path}")
    weights, metadata = read_weights_file(path)
    file_type = metadata.get("model_type")
    if expected_model_type is not None and file_type is not None and file_type != expected_model_type:
        raise ValueError(f"{path} was fine-tuned for model_type {file_type!r}, but the model is {expected_model_type!r}")

    targets = unwrap_model(model).state_dict(keep_vars=True)
    weights = _merge_adapters(strip_prefixes(weights), targets, metadata, path)
    weights = _resize_size_dependent(weights, targets, unwrap_model(model), metadata, path)
    unknown = [k for k in weights if k not in targets]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(targets[k].shape)}"
        for k, v in weights.items()
        if k in targets and v.shape != targets[k].shape
    ]
    fits = {k: v for k, v in weights.items() if k in targets and v.shape == targets[k].shape}
    if unknown or mismatched:
        made_for = f" (file says model_type {file_type!r}, image_size {metadata.get('image_size')})" if file_type else ""
        message = (
            f"{path} does not fit this model; it was probably made for another model type{made_for}."
            + (_listing("shape mismatches", mismatched) if mismatched else "")
            + (_listing("unknown keys (not in this model)", unknown) if unknown else "")
        )
        if strict or not fits:
            raise ValueError(message)
        warnings.warn(message + "\n  These entries were skipped (strict=False).", stacklevel=2)
    with torch.no_grad():
        for key, value in fits.items():
            targets[key].copy_(value)  # in place: keeps the model's dtype, device and optimizer references
    _warn_other_mixing(unwrap_model(model), metadata, path)
    return metadata


def _warn_other_mixing(model: nn.Module, metadata: Dict[str, Any], path: Path) -> None:
    """A file trained with FFT token mixing (--attention fft) has stock shapes and loads into any
    SAM, but a model that attends in those blocks computes something else: say so."""
    trained = sorted((metadata.get("attention") or {}).get("blocks") or [])
    if not all(isinstance(b, int) for b in trained):  # a last.pth names them as its flag did ("global")
        return
    blocks = getattr(getattr(model, "image_encoder", None), "blocks", [])
    have = [i for i, blk in enumerate(blocks) if type(getattr(blk, "attn", None)).__name__ == "FFTAttention"]
    if trained and trained != have:  # by class name: this module must not import the package (load_model_ex.py)
        warnings.warn(f"{path} was trained with FFT token mixing in image encoder blocks {trained}, but this model "
                      f"mixes by FFT in {have or 'no block'}; build it with attention='fft' "
                      f"(fft_blocks='{','.join(map(str, trained))}') to compute what was trained", stacklevel=3)
