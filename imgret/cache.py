"""Cache files that can be trusted: one writer at a time, checksums recorded at commit and verified on open,
damaged entries moved aside (never silently used, never left to fail every later run).

Locks are `fcntl` locks (through `filelock`): the kernel releases them when their process dies, so a kill -9
never leaves a lock that blocks the next run. The lock file stays beside what it guards.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

DAMAGED_DIR = ".damaged"
T = TypeVar("T")


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold `<path>.lock`; say once what is being waited for when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(path.name + ".lock")))
    try:
        lock.acquire(timeout=0.1)
    except Timeout:
        log.info("waiting for %s: another process holds it", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (`python -m imgret.bench --parts verify` times it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def describe_files(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """What commit records of each file: its size and content checksum."""
    return {name: {"bytes": (Path(folder) / name).stat().st_size, "digest": file_digest(Path(folder) / name)}
            for name in names}


def damage(folder: Path, recorded: dict[str, dict] | None) -> str | None:
    """Why the files in `folder` do not match what was recorded at commit, or None when they all do."""
    if not recorded:
        return "no checksums were recorded (written by an older imgret, or not committed)"
    for name, expected in recorded.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written"
        if file_digest(path) != expected["digest"]:
            return f"{name} does not match its checksum (altered after it was written)"
    return None


def move_aside(path: Path, why: str) -> Path:
    """Move a damaged cache entry into `.damaged/` beside it, for a person to inspect, and say so."""
    path = Path(path)
    target_dir = path.parent / DAMAGED_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(path, target)
    log.warning("damaged cache entry %s (%s): moved to %s; it will be made again", path, why, target)
    return target


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


def return_freed_memory() -> None:
    """Ask glibc to hand memory freed inside its heap back to the system. Filling an index frees many buffers
    (each inverted list grows by reallocation) and the heap would otherwise keep them resident.
    A no-op where the C library is not glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class Unreadable(Exception):
    """A cached file that matches its checksum but cannot be used (the library refuses it, the wrong shape)."""


def load_checked(path: Path, read: Callable[[Path, dict], T], companions: dict[str, str] | None = None) -> T | None:
    """A cache file saved by `save_checked`, read by `read(path, meta)` once it matches the size and checksum
    recorded beside it (`<stem>.json`, with `companions`: meta key -> suffix of a file that belongs to it); None
    when there is none. A damaged, unreadable or unrecorded one is moved aside with the reason (None: make it
    again)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() and not meta_path.is_file():
        return None
    beside = {key: path.with_suffix(suffix) for key, suffix in (companions or {}).items()}
    try:
        meta = json.loads(meta_path.read_text())
        expected = {path.name: meta["file"], **{beside[key].name: meta[key] for key in beside if key in meta}}
        problem = damage(path.parent, expected)
    except (OSError, ValueError, KeyError, TypeError):
        meta, problem = None, "its meta file is missing, unreadable or from an older imgret"
    if problem is None:
        try:
            return read(path, meta)
        except Unreadable as error:
            problem = str(error)
    for damaged in (path, meta_path, *beside.values()):
        if damaged.exists():
            move_aside(damaged, problem)
    return None


def save_checked(path: Path, write: Callable[[Path], None], meta: dict | None = None,
                 companions: dict[str, Path] | None = None) -> None:
    """`write(partial)` to a hidden partial file, then the meta file with its size and checksum (and those of
    `companions`, meta key -> a file already written beside it), each renamed into place: only a file whose meta
    file matches it counts as saved, however the process ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    partial = path.with_name(f".{path.stem}.{token}{path.suffix}")  # the suffix kept: np.savez would add one
    write(partial)
    meta = {**(meta or {}), "file": describe_files(path.parent, [partial.name])[partial.name]}
    for key, companion in (companions or {}).items():
        meta[key] = describe_files(companion.parent, [companion.name])[companion.name]
    os.replace(partial, path)
    partial_meta = path.with_name(f".{path.stem}.{token}.json")
    partial_meta.write_text(json.dumps(meta, indent=1))
    os.replace(partial_meta, path.with_suffix(".json"))
