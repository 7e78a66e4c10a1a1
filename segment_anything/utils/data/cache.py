"""An on-disk cache of image embeddings, for training with a frozen image encoder.

With the encoder frozen and no pixel-changing augmentation, an image's embedding depends only
on the image file and the encoder; every epoch after the first can read it instead of running
the encoder again (seconds per image for vit_b on a CPU).

One entry is one file ``<root>/<key[:2]>/<key>.emb``: a fixed header (magic, format version,
dtype, shape, payload length, BLAKE2b digest of the payload) followed by the raw tensor bytes.
The key is a hash of everything that changes the embedding (see ``embedding_key``), so a stale
entry is never found rather than detected. Writes go to a unique temporary file in the same
folder and are renamed into place (``os.replace`` is atomic), so concurrent writers of the same
entry (two ranks, two runs) and crashes never leave a half-written entry; a truncated or
corrupt entry (size or digest mismatch) is reported as a miss, logged and overwritten.
"""

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..log import get_logger
from ...modeling.fft_attention import fft_block_indices

# Bump when the encoder code or the image preprocessing (resize, normalise, pad) changes what
# an encoder computes for the same weights and pixels: old entries then stop matching.
ENCODER_CODE_VERSION = 1
MAGIC = b"SAMEMB01"
HEADER = struct.Struct("<8s16s4q32s")  # magic, dtype name, rank-3 shape, payload bytes, digest
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUFFIX = ".emb"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sam_finetune/embeddings`` (``~/.cache/sam_finetune/embeddings``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sam_finetune" / "embeddings"


_FILE_HASHES: Dict[Tuple[str, int, int], str] = {}


def file_hash(path) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    st = os.stat(path)
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo]


def weights_hash(*modules: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and values of the modules' state dicts and
    buffers (the weights actually loaded, after any resizing to --image_size)."""
    digest = hashlib.sha256()
    for module in modules:
        tensors = dict(module.state_dict())
        tensors.update({f"buffer.{k}": v for k, v in module.named_buffers()})
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embedding_key(image_hash: str, model_hash: str, **parts) -> str:
    """The entry name: a hash of the image bytes' hash, the encoder weights' hash and every
    other named part (model type, image size, dtypes, intensity flags...)."""
    text = json.dumps({"image": image_hash, "model": model_hash, "code": ENCODER_CODE_VERSION, **parts},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    stores: int = 0


@dataclass
class EmbeddingCache:
    """Lookups and stores for one model and one set of encoder inputs.

    ``key_parts`` holds everything except the image (model type, weights hash, image size,
    dtypes...); ``key_for(path)`` adds the image file's hash. Picklable: DataLoader workers
    get a copy and look entries up themselves (their counters stay in the worker).
    """

    root: Path
    dtype: str = "fp16"
    key_parts: Dict = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--cache_dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        self.root = Path(self.root)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key_for(self, image_path) -> str:
        parts = dict(self.key_parts, cache_dtype=self.dtype)
        model = parts.pop("weights", "")
        return embedding_key(file_hash(image_path), model, **parts)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / (key + SUFFIX)

    def lookup(self, key: str) -> Optional[torch.Tensor]:
        """The stored tensor (in the cache dtype), or None when absent or damaged."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        tensor = _decode(data)
        if tensor is None:
            self.stats.corrupt += 1
            self.stats.misses += 1
            get_logger().warning(f"embedding cache: {path} is truncated or corrupt; recomputing it")
            return None
        self.stats.hits += 1
        return tensor

    def store(self, key: str, tensor: torch.Tensor) -> None:
        """Write one entry atomically (temporary file in the same folder, then rename)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _encode(tensor.detach().to("cpu", self.torch_dtype))
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stats.stores += 1

    def round_trip(self, tensor: torch.Tensor) -> torch.Tensor:
        """What a later lookup will return for tensor, as float32 on its device: a miss trains
        on exactly what a hit would, so results do not depend on the cache's state."""
        return tensor.to(self.torch_dtype).float()

    def usage(self) -> Tuple[int, int]:
        """(entries, bytes) currently on disk."""
        count = size = 0
        if self.root.is_dir():
            for sub in os.scandir(self.root):
                if sub.is_dir():
                    for entry in os.scandir(sub.path):
                        if entry.name.endswith(SUFFIX):
                            count, size = count + 1, size + entry.stat().st_size
        return count, size


def _encode(tensor: torch.Tensor) -> bytes:
    if tensor.dim() != 3:
        raise ValueError(f"an embedding is (C, g, g), got shape {tuple(tensor.shape)}")
    payload = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    name = str(tensor.dtype).removeprefix("torch.").encode()
    digest = hashlib.blake2b(payload, digest_size=32).digest()
    return HEADER.pack(MAGIC, name, *tensor.shape, len(payload), digest) + payload


def _decode(data: bytes) -> Optional[torch.Tensor]:
    if len(data) < HEADER.size:
        return None
    magic, name, c, h, w, length, digest = HEADER.unpack_from(data)
    dtype = getattr(torch, name.rstrip(b"\0").decode(errors="replace"), None)
    payload = data[HEADER.size:]
    if (magic != MAGIC or not isinstance(dtype, torch.dtype) or len(payload) != length
            or length != c * h * w * dtype.itemsize or hashlib.blake2b(payload, digest_size=32).digest() != digest):
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(c, h, w)


# Flags that change what the encoder sees, beyond the image file and the weights; a flag that
# does not exist (yet) in the configuration is skipped.
INPUT_FLAGS = ("model_type", "image_size", "intensity_range", "intensity_scale", "channels")


def open_cache(cfg, sam: torch.nn.Module, amp_dtype: Optional[torch.dtype], log: bool = True) -> Optional[EmbeddingCache]:
    """The run's cache, or None (with the reason logged) when it cannot or must not be used:
    --no_cache, a trained image encoder, or augmentation that changes the pixels."""
    logger = get_logger()
    reason = None
    if cfg.no_cache:
        reason = "--no_cache"
    elif any(p.requires_grad for p in sam.image_encoder.parameters()):
        reason = "the image encoder is trained, so its embeddings change every step"
    elif getattr(cfg, "augment", None):
        reason = f"--augment {cfg.augment} changes the pixels the encoder sees on every epoch"
    if reason is not None:
        if log:
            logger.info(f"embedding cache off: {reason}")
        return None
    parts = {flag: getattr(cfg, flag) for flag in INPUT_FLAGS if hasattr(cfg, flag)}
    parts["weights"] = weights_hash(sam.image_encoder, _Preprocess(sam))
    parts["compute_dtype"] = str(amp_dtype)
    if fft_block_indices(sam):  # FFT mixing (issue 10) makes other embeddings from the same weights;
        parts["fft_blocks"] = fft_block_indices(sam)  # only then in the key: stock runs keep their entries
    cache = EmbeddingCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), cfg.cache_dtype, parts)
    if log:
        count, size = cache.usage()
        logger.info(f"embedding cache: {cache.root} ({count} entries, {size / 2**20:.1f} MB on disk), "
                    f"{cfg.cache_dtype}, weights {parts['weights'][:12]}")
    return cache


class _Preprocess(torch.nn.Module):
    """The pixel mean and std Sam.preprocess applies: part of the encoder input."""

    def __init__(self, sam: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", sam.pixel_mean.detach().clone())
        self.register_buffer("pixel_std", sam.pixel_std.detach().clone())
