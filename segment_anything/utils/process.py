"""Process-wide settings for training workers and tools: memory kept between steps, a quick exit."""

import atexit
import ctypes
import gc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from <malloc.h>


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for the next step instead of giving it back to the kernel.

    A training step allocates and frees the same large tensors every time (the original-size
    loss of many objects: tens of MB). By default glibc returns freed blocks at the top of its heap
    (over 128 KB, adjusted upwards as blocks come and go, at most 64 MB) and serves blocks over its
    mmap threshold from fresh pages, which the kernel must zero again at every step: system time
    that grows with the objects in a step. Blocks up to 32 MB now come from the heap, and up to
    2 GB of freed heap is kept. The process's resident size then stays near its peak, as with
    PyTorch's CUDA caching allocator. Elsewhere than glibc, or if mallopt is missing: nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


def skip_collection_at_exit() -> None:
    """Let the interpreter's last garbage collections skip every object alive at exit.

    torch leaves hundreds of thousands of objects that the collector walks again while Python
    shuts down, a delay every worker, tool and test subprocess pays (bench/exit.py). gc.freeze()
    as the last exit handler moves them out of the collector's reach; memory goes back to the
    system with the process, and our writers close their files before exit, not in finalizers.
    """
    atexit.unregister(gc.freeze)  # once per process, however many callers (launcher, worker, tool)
    atexit.register(gc.freeze)
