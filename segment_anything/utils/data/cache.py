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

Disk space: ``max_bytes`` (--cache_max_gb) bounds the folder. A hit or a store sets the entry's
modification time to now, so the oldest modification time is the least recently used entry, for
every process that shares the folder (ranks, loader workers, nodes on a shared file system);
when a store would pass the bound, the least recently used entries are removed first, down to
nine tenths of it, so the folder is scanned once per tenth of the bound written rather than on
every store. An evicted entry is a miss the next time and is recomputed. Each process counts its
own stores between scans, so with P processes writing at once the folder can pass the bound by up
to P - 1 tenths of it until their next scans. A store that fails (a full disk, a quota, a
read-only folder) is logged once per process and training goes on with the computed embedding.
"""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..log import get_logger
from ...modeling.fft_attention import fft_block_indices

# Bump when the encoder code or the image preprocessing (resize, normalise, pad) changes what
# an encoder computes for the same weights and pixels: old entries then stop matching.
ENCODER_CODE_VERSION = 1
MAGIC = b"SAMEMB02"  # 02: SHA-256 digest (40% of BLAKE2b's time on CPUs with SHA instructions)
OLDER = (b"SAMEMB01",)  # earlier formats: recomputed once, not reported as damaged
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
    evicted: int = 0
    failed_stores: int = 0


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
    max_bytes: int = 0  # 0: no bound
    used: Optional[int] = None  # bytes on disk at the last scan plus this process's stores since
    warned: bool = False  # a failed store was logged

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--cache_dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_bytes < 0:
            raise ValueError(f"--cache_max_gb must be >= 0 (0: no bound), got {self.max_bytes / 2**30:g}")
        self.root = Path(self.root)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key_for(self, image_path, **more) -> str:
        """The key of an image file; more: what else selects the encoder's input (a tile's rectangle)."""
        parts = dict(self.key_parts, **more, cache_dtype=self.dtype)
        model = parts.pop("weights", "")
        return embedding_key(file_hash(image_path), model, **parts)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / (key + SUFFIX)

    def lookup(self, key: str) -> Optional[torch.Tensor]:
        """The stored tensor (in the cache dtype), or None when absent or damaged."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:  # absent, or evicted by another process while being read
            self.stats.misses += 1
            return None
        tensor = _decode(data)
        if tensor is None:
            self.stats.misses += 1
            if data[:8] not in OLDER:  # an entry of an earlier format is rewritten quietly by the next store
                self.stats.corrupt += 1
                get_logger().warning(f"embedding cache: {path} is truncated or corrupt; recomputing it")
            return None
        self.stats.hits += 1
        _touch(path)
        return tensor

    def store(self, key: str, tensor: torch.Tensor) -> bool:
        """Write one entry atomically (temporary file in the same folder, then rename), after
        making room under the bound. Returns False when the entry could not be written (logged
        once per process); the caller goes on with the tensor it has."""
        path = self.path(key)
        data = _encode(tensor.detach().to("cpu", self.torch_dtype))
        if self.max_bytes and len(data) > self.max_bytes:
            return self._failed(f"one entry ({len(data) / 2**20:.1f} MB) is larger than --cache_max_gb")
        tmp = None
        try:
            self._make_room(len(data))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
            _touch(path)
        except OSError as err:
            return self._failed(f"{err.strerror or err}")
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self.stats.stores += 1
        if self.used is not None:
            self.used += len(data)
        return True

    def _failed(self, reason: str) -> bool:
        self.stats.failed_stores += 1
        if not self.warned:
            self.warned = True
            get_logger().warning(f"embedding cache: cannot write to {self.root} ({reason}); training goes on, "
                                 "computing the embeddings it cannot store (logged once)")
        return False

    def _make_room(self, incoming: int) -> None:
        """Remove the least recently used entries when storing incoming bytes would pass the bound."""
        if not self.max_bytes or (self.used is not None and self.used + incoming <= self.max_bytes):
            return
        entries = self.entries()
        self.used = sum(size for _, size, _ in entries)
        if self.used + incoming <= self.max_bytes:
            return
        target = self.max_bytes * 9 // 10 - incoming
        for _, size, path in sorted(entries):
            if self.used <= target:
                break
            try:
                os.unlink(path)
                self.stats.evicted += 1
            except FileNotFoundError:  # another process evicted it first
                pass
            self.used -= size

    def entries(self) -> List[Tuple[int, int, str]]:
        """(modification time ns, bytes, path) of every entry on disk."""
        found = []
        if self.root.is_dir():
            for sub in os.scandir(self.root):
                if not sub.is_dir():
                    continue
                for entry in os.scandir(sub.path):
                    if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                        try:
                            st = entry.stat()
                        except FileNotFoundError:
                            continue
                        found.append((st.st_mtime_ns, st.st_size, entry.path))
        return found

    def round_trip(self, tensor: torch.Tensor) -> torch.Tensor:
        """What a later lookup will return for tensor, as float32 on its device: a miss trains
        on exactly what a hit would, so results do not depend on the cache's state."""
        return tensor.to(self.torch_dtype).float()

    def usage(self) -> Tuple[int, int]:
        """(entries, bytes) currently on disk."""
        entries = self.entries()
        return len(entries), sum(size for _, size, _ in entries)


def _touch(path: Path) -> None:
    """Mark an entry used now (the eviction order). time.time_ns, not the file system's coarser
    clock, so that entries used one after the other keep their order."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:  # a read-only cache, or evicted meanwhile: the order is only a preference
        pass


def entry_bytes(sam: torch.nn.Module, dtype: str) -> int:
    """The size of one entry on disk for this model: header plus a (C, g, g) tensor."""
    grid_h, grid_w = sam.prompt_encoder.image_embedding_size
    return HEADER.size + sam.prompt_encoder.embed_dim * grid_h * grid_w * DTYPES[dtype].itemsize


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds folder (or would hold it: its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _encode(tensor: torch.Tensor) -> bytes:
    if tensor.dim() != 3:
        raise ValueError(f"an embedding is (C, g, g), got shape {tuple(tensor.shape)}")
    payload = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    name = str(tensor.dtype).removeprefix("torch.").encode()
    return HEADER.pack(MAGIC, name, *tensor.shape, len(payload), hashlib.sha256(payload).digest()) + payload


def _decode(data: bytes) -> Optional[torch.Tensor]:
    if len(data) < HEADER.size:
        return None
    magic, name, c, h, w, length, digest = HEADER.unpack_from(data)
    dtype = getattr(torch, name.rstrip(b"\0").decode(errors="replace"), None)
    payload = memoryview(data)[HEADER.size:]
    if (magic != MAGIC or not isinstance(dtype, torch.dtype) or len(payload) != length
            or length != c * h * w * dtype.itemsize or hashlib.sha256(payload).digest() != digest):
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(c, h, w)


# Flags that change what the encoder sees, beyond the image file and the weights.
INPUT_FLAGS = ("model_type", "image_size", "intensity_range", "channels", "plane")


@dataclass(frozen=True)
class CacheSpec:
    """What a run asks of the cache (training.config's resolve builds it from the flags)."""

    inputs: Dict[str, object]  # INPUT_FLAGS -> the run's value: part of every key
    enabled: bool = True  # False: --no_cache
    augment: str = ""  # --augment as given; augmentation changes the pixels, so it turns the cache off
    folder: Optional[str] = None  # --cache_dir; None: default_cache_dir()
    dtype: str = "fp16"  # --cache_dtype
    max_gb: float = 0.0  # --cache_max_gb; 0: no bound


def open_cache(spec: CacheSpec, sam: torch.nn.Module, amp_dtype: Optional[torch.dtype], log: bool = True,
               images: int = 0) -> Optional[EmbeddingCache]:
    """The run's cache, or None (with the reason logged) when it cannot or must not be used:
    --no_cache, a trained image encoder, or augmentation that changes the pixels. images: the
    run's image count, for the log line of the space it needs against the space free."""
    logger = get_logger()
    reason = None
    if not spec.enabled:
        reason = "--no_cache"
    elif any(p.requires_grad for p in sam.image_encoder.parameters()):
        reason = "the image encoder is trained, so its embeddings change every step"
    elif spec.augment:
        reason = f"--augment {spec.augment} changes the pixels the encoder sees on every epoch"
    if reason is not None:
        if log:
            logger.info(f"embedding cache off: {reason}")
        return None
    parts = {flag: spec.inputs[flag] for flag in INPUT_FLAGS}
    parts["weights"] = weights_hash(sam.image_encoder, _Preprocess(sam))
    parts["compute_dtype"] = str(amp_dtype)
    if fft_block_indices(sam):  # FFT mixing makes other embeddings from the same weights;
        parts["fft_blocks"] = fft_block_indices(sam)  # only then in the key: stock runs keep their entries
    cache = EmbeddingCache(Path(spec.folder) if spec.folder else default_cache_dir(), spec.dtype, parts,
                           max_bytes=int(spec.max_gb * 2**30))
    if log:
        count, size = cache.usage()
        logger.info(f"embedding cache: {cache.root} ({count} entries, {size / 2**20:.1f} MB on disk), "
                    f"{spec.dtype}, weights {parts['weights'][:12]}")
        log_space(cache, entry_bytes(sam, spec.dtype), images, size)
    return cache


def log_space(cache: EmbeddingCache, entry: int, images: int, on_disk: int) -> None:
    """One line: what this run's entries take against the disk's free space and the bound; a
    warning when they cannot all fit (the run still trains: a store that fails is a miss)."""
    need, free = entry * images, free_bytes(cache.root)
    gb = 2**30
    line = (f"embedding cache: this run needs up to {need / gb:.2f} GB ({images} images x {entry / 2**20:.2f} MB); "
            f"{free / gb:.1f} GB free on its disk")
    if cache.max_bytes:
        line += f", bounded to {cache.max_bytes / gb:g} GB by --cache_max_gb (least recently used entries go first)"
    room = free + on_disk if not cache.max_bytes else min(cache.max_bytes, free + on_disk)
    if need > room:
        get_logger().warning(line + "; not every entry fits: the rest are recomputed every epoch"
                             + ("" if cache.max_bytes else " (set --cache_max_gb to keep the disk from filling)"))
    else:
        get_logger().info(line)


class _Preprocess(torch.nn.Module):
    """The pixel mean and std Sam.preprocess applies: part of the encoder input."""

    def __init__(self, sam: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", sam.pixel_mean.detach().clone())
        self.register_buffer("pixel_std", sam.pixel_std.detach().clone())
