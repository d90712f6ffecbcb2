"""An index kept as a folder of files (NGT, DiskANN, ScaNN, a database): the working folders it is opened from,
named for their host and process so that a killed run's are removed by the next, and packed into the one file the
index cache checks."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class FolderIndex:
    """An index of a library that builds and loads from a folder of files (NGT, DiskANN): the loaded index and
    that folder, kept while the index lives (the cache packs it into one file)."""

    index: Any
    folder: tempfile.TemporaryDirectory
    graph: str = ""  # the file or subfolder in it that the index was opened from

    @property
    def path(self) -> Path:
        return Path(self.folder.name)


def new_folder(near: Path | None, elsewhere: Path | None = None) -> tempfile.TemporaryDirectory:
    """A working folder beside the index cache's file (same filesystem), or in `elsewhere`, or in the system's temp
    folder."""
    if elsewhere is not None or near is None:
        return process_folder(Path(elsewhere or tempfile.gettempdir()),
                              f"imgret-{near.stem}.work." if near else "imgret-index-work.")
    return process_folder(near.parent, f".{near.stem}.work.")


def process_folder(where: Path, stem: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named for this host and process: making one first removes those of this host whose
    process is gone (a killed run's), never another host's (a cache on a shared filesystem). The host is a short
    hash of its name, as a PostgreSQL socket's path has room for little."""
    owner = f"{stem}{zlib.crc32(socket.gethostname().encode()):08x}-"
    for abandoned in Path(where).glob(glob.escape(owner) + "*"):
        pid = abandoned.name[len(owner):].split(".")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(abandoned, ignore_errors=True)
    return tempfile.TemporaryDirectory(dir=where, prefix=f"{owner}{os.getpid()}.")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def pack_folder(folder: Path, path: Path) -> None:
    """A folder of index files packed into the one file the index cache checks and renames."""
    with tarfile.open(path, "w") as packed:
        for item in sorted(Path(folder).iterdir()):
            packed.add(item, arcname=item.name)


def unpack_folder(path: Path, folder: tempfile.TemporaryDirectory | None = None) -> tempfile.TemporaryDirectory:
    """The folder `pack_folder` packed, unpacked into a working folder beside it (or `folder`) for the library to
    load from."""
    folder = folder or new_folder(path)
    with tarfile.open(path) as packed:
        packed.extractall(folder.name, filter="data")
    return folder
