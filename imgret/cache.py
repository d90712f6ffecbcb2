"""Cache files that can be trusted: one writer at a time, checksums recorded at commit and verified on open,
damaged entries moved aside (never silently used, never left to fail every later run).

Locks are `fcntl` locks (through `filelock`): the kernel releases them when their process dies, so a kill -9
never leaves a lock that blocks the next run. The lock file stays beside what it guards.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

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


# Files this process has checked, by what the file system says of them: a sweep's points in one process open the same
# store and index again and again, and hashing a store of tens of gigabytes costs minutes each time. A file written
# since (another size, modification time or inode) is checked again.
_VERIFIED: dict[tuple, str] = {}


def verified_digest(path: Path) -> str:
    """file_digest(path), computed once per process for a file that has not changed since."""
    found = path.stat()
    key = (str(path.resolve()), found.st_size, found.st_mtime_ns, found.st_ino, found.st_ctime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_digest(path)
    return _VERIFIED[key]


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
        if verified_digest(path) != expected["digest"]:
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
