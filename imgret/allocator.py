"""Memory a model's forward frees, kept for its next batch.

glibc's malloc serves an allocation above its mmap threshold (at most 32 MiB, however it is set at run time) with
a fresh mmap and hands it back with munmap when it is freed, and it trims the heap's free top above its trim
threshold. A CNN's activations at a batch of 64 are tens to hundreds of MB a layer, so on every batch each layer's
output is mapped, faulted in page by page by the kernel, and unmapped again: more CPU time in the kernel than in
the model. While a model runs (`kept_freed_memory`), no allocation is mmapped and the heap is never trimmed, so a
batch reuses the pages the previous one freed; afterwards glibc's settings are restored and what was kept is
returned to the system (malloc_trim). Only where memory comes from changes: not a single value a model computes.

Processes forked while the block runs (DataLoader workers) inherit the setting; processes that start a model
themselves (DDP ranks, torchrun's processes, the demo) enter the block where they run it. Elsewhere than glibc
(musl, macOS) the block does nothing. `python -m imgret.bench --parts allocator` measures the alternatives.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading

# mallopt's parameters (malloc.h) and glibc's defaults for the two the block changes
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_TRIM_THRESHOLD, GLIBC_MMAP_MAX = 128 * 1024, 65536
KEPT_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: the largest it accepts, far above any model's working set

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (it has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(libc: ctypes.CDLL) -> None:
    """From now on no allocation is mmapped and the heap's free top is kept (both process-wide)."""
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)


@contextlib.contextmanager
def kept_freed_memory():
    """Run a model with its freed memory kept for the next batch (nested and concurrent blocks share one
    setting, restored when the last one ends)."""
    global _depth
    libc = glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            keep_freed_memory(libc)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def keeping() -> bool:
    """Whether a `kept_freed_memory` block is running in this process."""
    return _depth > 0


def return_freed_memory() -> None:
    """Ask glibc to hand memory freed inside its heap back to the system. Filling an index frees many buffers
    (each inverted list grows by reallocation) and the heap would otherwise keep them resident; a server's burst
    of decodes likewise. A no-op where the C library is not glibc."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
