"""What the vector databases share: a database is a folder of the engine's files (and, for a server, the process
serving them), made by ingesting the gallery's rows (timed apart) and creating the engine's index over them.

The index cache holds a database like NGT's or DiskANN's folder: packed into one checked file once the engine has
written everything out (a server stopped cleanly first), unpacked into a working folder of its own for each run, so
no two runs ever open the same database files. A run's database is closed, and its server stopped, when the run
ends (`Method.close`).

Searches go through one session per thread (a connection, a cursor): concurrent clients each hold their own, as
they would against a real deployment.
"""
from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TYPE_CHECKING

import numpy as np

from imgret.errors import bad_value
from imgret.index.base import Method, new_folder, pack_folder, plain_rows, run_in_threads, top_k_arrays, unpack_folder
from imgret.index.params import hnsw_params
from imgret.index.servers import Server

if TYPE_CHECKING:  # annotations only: imgret.index.methods imports the index package
    from imgret.index.methods import MethodSettings


@dataclass
class Database:
    """An open database: its working folder, the engine's handle, its server (None for an embedded engine), and
    the ingest and index-creation times of when it was made."""

    folder: tempfile.TemporaryDirectory
    opts: dict = field(default_factory=dict)  # the method's settings it was made or opened with
    handle: Any = None
    server: Server | None = None
    ingest_s: float = 0.0
    index_create_s: float = 0.0
    sessions: dict[int, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def path(self) -> Path:
        return Path(self.folder.name)

    def disk_bytes(self) -> int:
        return sum(entry.stat().st_size for entry in self.path.rglob("*") if entry.is_file() and not entry.is_socket())


class GraphSettings:
    """A database's HNSW settings, checked alike: its degree and build list (build), its search list (query), at
    least k long."""

    params = hnsw_params(minimum=2)
    variant_param = "ef_search"

    def check_k(self, opts: MethodSettings, k: int) -> None:
        if opts[self.variant_param] < k:
            raise bad_value(self.variant_param, opts[self.variant_param], f"at least k ({k})")


class DatabaseMethod(Method):
    """A vector database on the method registry. Subclasses implement `create_in` (an empty database in a folder),
    `ingest`, `create_index`, `open` (an existing database's files), `shut` (everything written out, the server
    stopped), `connect` (a session for one thread) and `query` (one query's ids and scores through a session)."""

    query_path = "SQL"  # how imgret reaches the engine: "SQL", or its "client API"
    database_type: type[Database] = Database  # what an open database of this engine holds (a subclass with its state)
    file_suffix = ".db.tar"
    ordering = "inner product"

    # ------------------------------------------------------------------ what each engine provides

    def create_in(self, database: Database, opts: MethodSettings, dim: int) -> None:
        """An empty database (a table of `dim`-wide rows) in `database.folder`: set `handle` and `server`."""
        raise NotImplementedError

    def ingest(self, database: Database, gallery: np.ndarray) -> None:
        raise NotImplementedError

    def create_index(self, database: Database, opts: MethodSettings, threads: int) -> None:
        raise NotImplementedError

    def open(self, database: Database, opts: MethodSettings) -> None:
        """Open the files in `database.folder` (start its server): set `handle` and `server`."""
        raise NotImplementedError

    def shut(self, database: Database) -> None:
        """Write everything out and release the files (stop the server): the folder can be copied."""
        if database.server is not None:
            database.server.stop()
            database.server = None

    def connect(self, database: Database) -> Any:
        return database.handle

    def disconnect(self, session: Any) -> None:
        close = getattr(session, "close", None)
        if close is not None:
            close()

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        """One query's (gallery ids, cosine similarities), best first."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the Method interface

    def working_folder(self, near: Path | None) -> tempfile.TemporaryDirectory:
        """Where a run's copy of the database lives: beside the index cache's file (the same filesystem)."""
        return new_folder(near)

    def build(self, opts: MethodSettings, gallery: np.ndarray, threads: int, path: Path | None = None) -> Database:
        folder = self.working_folder(path)
        database = self.database_type(folder, dict(opts))
        try:
            self.create_in(database, opts, gallery.shape[1])
            start = time.perf_counter()
            self.ingest(database, plain_rows(gallery))
            database.ingest_s = time.perf_counter() - start
            start = time.perf_counter()
            self.create_index(database, opts, threads)
            database.index_create_s = time.perf_counter() - start
        except BaseException:
            self.close(database)
            raise
        return database

    def save(self, native: Database, path: Path) -> None:
        self._close_sessions(native)
        self.shut(native)
        pack_folder(native.path, path)
        self.open(native, native.opts)

    def load(self, path: Path, opts: MethodSettings, meta: dict) -> Database:
        database = self.database_type(unpack_folder(path, self.working_folder(path)), dict(opts),
                                      ingest_s=float(meta.get("ingest_s", 0.0)),
                                      index_create_s=float(meta.get("index_create_s", 0.0)))
        try:
            self.open(database, opts)
        except BaseException:
            self.close(database)
            raise
        return database

    def meta(self, native: Database) -> dict:
        return {"ingest_s": native.ingest_s, "index_create_s": native.index_create_s}

    def run_metrics(self, native: Database) -> dict[str, float]:
        metrics = {"ingest_s": native.ingest_s, "index_create_s": native.index_create_s,
                   "db_disk_bytes": float(native.disk_bytes())}
        if native.server is not None:
            native.server.resident_bytes()
            metrics["server_peak_rss_bytes"] = float(native.server.peak_resident_bytes)
        return metrics

    def close(self, native: Database) -> None:
        self._close_sessions(native)
        with contextlib.suppress(Exception):
            self.shut(native)
        if native.server is not None:  # shut failed half-way: the server is stopped all the same
            native.server.stop()
        native.folder.cleanup()

    def session(self, native: Database) -> Any:
        key = threading.get_ident()
        with native.lock:
            found = native.sessions.get(key)
        if found is None:
            found = self.connect(native)
            with native.lock:
                native.sessions[key] = found
        return found

    def _close_sessions(self, native: Database) -> None:
        with native.lock:
            sessions, native.sessions = list(native.sessions.values()), {}
        for session in sessions:
            if session is not native.handle:
                with contextlib.suppress(Exception):
                    self.disconnect(session)

    def bare(self, native: Database, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return run_in_threads(lambda query: self.query(self.session(native), query, k, setting), queries, threads)

    def results(self, found, k: int):
        return top_k_arrays([ids for ids, _ in found], [scores for _, scores in found], k)
