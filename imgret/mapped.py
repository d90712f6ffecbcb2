"""Reading memory-mapped stores without letting them fill the resident set: drop rows already read
(`release_pages`) and read scattered rows with pread rather than through the map (`gather_rows`); and writing a
large file without holding it in the page cache (`written_back`)."""
from __future__ import annotations

import mmap
import os

import numpy as np


def _file_mapping(array: np.ndarray):
    """(the np.memmap under `array`, its mmap object, where `array` starts inside the mapping), or Nones for
    an array that is not a memory map. (A slice of a np.memmap keeps its parent's `offset`, so the start is
    measured from the mapping's own address.)"""
    base = array
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    mapping = getattr(base, "_mmap", None)
    if mapping is None:
        return None, None, None
    mapping_start = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
    return base, mapping, array.__array_interface__["data"][0] - mapping_start


def is_mapped(array: np.ndarray) -> bool:
    """Whether `array` reads a memory-mapped file (rather than this process's memory)."""
    return _file_mapping(array)[0] is not None


def release_pages(array: np.ndarray, start_row: int = 0, stop_row: int | None = None) -> None:
    """Drop rows [start_row, stop_row) of a memory-mapped store from this process's resident set.

    Pages of a read-only file map that were read stay in the page cache, so reading them again costs no disk
    I/O; dropping them keeps the resident set bounded while a whole gallery streams past. A no-op for arrays
    that are not memory maps."""
    _, mapping, within = _file_mapping(array)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    row_bytes = array.strides[0]
    page = mmap.PAGESIZE
    first = (within + start_row * row_bytes) // page * page
    last = within + (len(array) if stop_row is None else stop_row) * row_bytes
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, min(last, len(mapping)) - first)


def gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`array[rows]`, read with pread when `array` is a memory-mapped store.

    Touching scattered rows of a file map maps far more than the rows: the kernel maps whole page-cache
    folios around each fault, so a few thousand random rows of a million-row store can add gigabytes to the
    resident set. Reading them into a fresh array maps nothing."""
    base, _, within = _file_mapping(array)
    rows = np.asarray(rows, dtype=np.int64)
    if base is None or not array.flags.c_contiguous or base.filename is None:
        return np.asarray(array[rows])
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    row_bytes = array.strides[0]
    start = base.offset - base.offset % mmap.ALLOCATIONGRANULARITY + within  # numpy maps from that boundary
    with open(base.filename, "rb", buffering=0) as handle:
        descriptor = handle.fileno()
        for i, row in enumerate(rows.tolist()):
            if os.preadv(descriptor, [out[i].data.cast("B")], start + row * row_bytes) != row_bytes:
                raise OSError(f"{base.filename}: row {row} is cut short")
    return out


def written_back(descriptor: int) -> None:
    """What was written to the open file goes to disk and leaves the page cache: a file larger than memory is
    otherwise held as dirty pages, which a memory cap (a cgroup's) counts and cannot reclaim until they are written."""
    os.fdatasync(descriptor)
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
