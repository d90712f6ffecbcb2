"""What the vector databases share: a database is a folder of the engine's files (and, for a server, the process
serving them), made by ingesting the gallery's rows (timed apart) and creating the engine's index over them.

The index cache holds a database like NGT's or DiskANN's folder: packed into one checked file once the engine has
written everything out (a server stopped cleanly first), unpacked into a working folder of its own for each run, so
no two runs ever open the same database files. A run's database is closed, and its server stopped, when the run
ends (`Database.close`).

Searches go through one session per thread (a connection, a cursor): concurrent clients each hold their own, as
they would against a real deployment.

Every database stores each row's filter keys with it (`RowKeys`: columns `label` and `attribute`) and searches under
a filter with its own condition on them (SQL `WHERE`, a payload filter, a filter expression), one query per call
(each query has its own condition); it checks that the keys it holds are the ones the filter reads.
"""
from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.errors import ImgretError, bad_value
from imgret.index.filters import RowFilter, RowKeys, Where
from imgret.index.base import Method, plain_rows, run_in_threads, top_k_arrays
from imgret.index.folders import new_folder, pack_folder, process_folder, unpack_folder
from imgret.index.params import HnswGraph, MethodParams, hnsw_params
from imgret.index.servers import Server, hand_over

SOCKET_PATH_MAX = 100  # a unix socket's path must fit sockaddr_un (107 bytes)
PLAN_SAMPLE = 20  # filtered queries whose plans a run records


@dataclass(eq=False)
class Database:
    """An open database of one engine: its working folder, the engine's handle, its server (None for an embedded
    engine), the sessions of the threads searching it, and the ingest and index-creation times of when it was made.
    Each engine subclasses it with its own state and implements `create` (an empty table in the folder), `ingest`,
    `create_index`, `open` (existing files), `shut` (everything written out, the server stopped), `connect` (a
    session for one thread) and `query` (one query's ids and scores through a session); the rest is shared."""

    method: DatabaseMethod  # the registered method: its declaration, and what differs between its indexes
    folder: tempfile.TemporaryDirectory
    opts: MethodParams  # the method's settings it was made or opened with
    handle: Any = None
    server: Server | None = None
    ingest_s: float = 0.0
    index_create_s: float = 0.0
    sessions: dict[int, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the server's socket in a short folder of its own in /tmp, where the database's path is too long for one
    socket_folder: tempfile.TemporaryDirectory | None = None
    row_keys: RowKeys | None = None  # the keys being stored with the rows (while the database is made)
    key_digests: dict = field(default_factory=dict)  # the digests of the keys it holds, per column

    @property
    def path(self) -> Path:
        return Path(self.folder.name)

    def socket_dir(self, socket_name: str, prefix: str, owner: tuple[int, int] | None = None) -> Path:
        """The folder a server's unix socket `socket_name` goes in: the database's own, or where that path would not
        fit a socket address (107 bytes), a short folder of this process's in /tmp (made `owner`'s)."""
        if len(str(self.path / socket_name)) <= SOCKET_PATH_MAX:
            return self.path
        if self.socket_folder is None:
            self.socket_folder = process_folder(Path(tempfile.gettempdir()), prefix)
            hand_over(Path(self.socket_folder.name), owner)
        return Path(self.socket_folder.name)

    def disk_bytes(self) -> int:
        return sum(entry.stat().st_size for entry in self.path.rglob("*") if entry.is_file() and not entry.is_socket())

    # ------------------------------------------------------------------ what each engine provides

    def create(self, dim: int) -> None:
        """An empty database (a table of `dim`-wide rows) in the folder: set `handle` (and `server`)."""
        raise NotImplementedError

    def ingest(self, gallery: np.ndarray) -> None:
        raise NotImplementedError

    def create_index(self, threads: int) -> None:
        raise NotImplementedError

    def open(self) -> None:
        """Open the files in the folder (start its server): set `handle` (and `server`)."""
        raise NotImplementedError

    def shut(self) -> None:
        """Write everything out and release the files (stop the server): the folder can be copied."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.socket_folder is not None:
            self.socket_folder.cleanup()
            self.socket_folder = None

    def connect(self) -> Any:
        return self.handle

    def disconnect(self, session: Any) -> None:
        close = getattr(session, "close", None)
        if close is not None:
            close()

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        """One query's (gallery ids, cosine similarities), best first."""
        raise NotImplementedError

    def filtered(self, session: Any, query: np.ndarray, k: int, setting: Mapping, where: Where) -> tuple[list, list]:
        """One query's (gallery ids, cosine similarities) among the rows `where` allows, by the engine's own filter."""
        raise NotImplementedError

    def plan(self, query: np.ndarray, k: int, setting: Mapping, where: Where) -> str | None:
        """The engine's plan for one filtered query, in a few words (an SQL engine's EXPLAIN), where it plans."""
        return None

    # ------------------------------------------------------------------ shared

    def keys_column(self, column: str) -> np.ndarray:
        """The column of `row_keys` the engine stores under `column` (label, attribute), as whole numbers."""
        return getattr(self.row_keys, column)

    def check_keys(self, row_filter: RowFilter) -> None:
        """A filter reads the keys this database holds with its rows, or it is refused (no silent wrong filter)."""
        if self.key_digests.get(row_filter.kind) != row_filter.keys_digest:
            raise ImgretError(f"{self.method.label} holds other {row_filter.kind} keys with its rows than the filter "
                              f"reads: build it with the gallery's keys (build_index's row_keys=RowKeys.of(labels))")

    def bare_filtered(self, queries: np.ndarray, k: int, setting: Mapping, threads: int, wheres: list[Where]):
        """Each query under its own condition: one call per query, each thread on its session."""
        return run_in_threads(lambda i: self.filtered(self.session(), queries[i], k, setting, wheres[i]),
                              np.arange(len(queries)), threads)

    def make(self, gallery: np.ndarray, threads: int) -> None:
        """Create, ingest (timed) and index (timed); a failure closes it, server and folder."""
        try:
            self.row_keys = self.row_keys or RowKeys.unlabelled(len(gallery))
            self.key_digests = self.row_keys.digests()
            self.create(gallery.shape[1])
            start = time.perf_counter()
            self.ingest(plain_rows(gallery))
            self.ingest_s = time.perf_counter() - start
            start = time.perf_counter()
            self.create_index(threads)
            self.index_create_s = time.perf_counter() - start
        except BaseException:
            self.close()
            raise

    def reopen(self) -> None:
        """Open the files unpacked from the cache; a failure closes it."""
        try:
            self.open()
        except BaseException:
            self.close()
            raise

    def save(self, path: Path) -> None:
        self.close_sessions()
        self.shut()
        pack_folder(self.path, path)
        self.open()

    def meta(self) -> dict:
        return {"ingest_s": self.ingest_s, "index_create_s": self.index_create_s, "row_keys": self.key_digests}

    def run_metrics(self) -> dict[str, float]:
        metrics = {"ingest_s": self.ingest_s, "index_create_s": self.index_create_s,
                   "db_disk_bytes": float(self.disk_bytes())}
        if self.server is not None:
            self.server.resident_bytes()
            metrics["server_peak_rss_bytes"] = float(self.server.peak_resident_bytes)
        return metrics

    def close(self) -> None:
        self.close_sessions()
        with contextlib.suppress(Exception):
            self.shut()
        if self.server is not None:  # shut failed half-way: the server is stopped all the same
            self.server.stop()
        self.folder.cleanup()

    def session(self) -> Any:
        key = threading.get_ident()
        with self.lock:
            found = self.sessions.get(key)
        if found is None:
            found = self.connect()
            with self.lock:
                self.sessions[key] = found
        return found

    def close_sessions(self) -> None:
        with self.lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            if session is not self.handle:
                with contextlib.suppress(Exception):
                    self.disconnect(session)

    def bare(self, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        """The engine's own calls for these queries: one query per call, each thread on its session."""
        return run_in_threads(lambda query: self.query(self.session(), query, k, setting), queries, threads)


class GraphSettings(HnswGraph):
    """A database's HNSW settings, checked alike: its degree and build list (build) at least 2, its search list
    (query) at least k long."""

    params = hnsw_params(minimum=2)

    def check_k(self, opts: MethodParams, k: int) -> None:
        if opts[self.variant_param] < k:
            raise bad_value(self.variant_param, opts[self.variant_param], f"at least k ({k})")


class DatabaseMethod(Method):
    """A vector database on the method registry: its declaration (parameters, checks, label) and `database_type`,
    the engine's `Database` subclass, which holds an open database's state and does the engine's work."""

    query_path = "SQL"  # how imgret reaches the engine: "SQL", or its "client API"
    database_type: type[Database] = Database
    file_suffix = ".db.tar"
    ordering = "inner product"
    stores_row_keys = True

    def working_folder(self, near: Path | None) -> tempfile.TemporaryDirectory:
        """Where a run's copy of the database lives: beside the index cache's file (the same filesystem)."""
        return new_folder(near)

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None,
              row_keys: RowKeys | None = None) -> Database:
        database = self.database_type(self, self.working_folder(path), opts, row_keys=row_keys)
        database.make(gallery, threads)
        return database

    def save(self, native: Database, path: Path) -> None:
        native.save(path)

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Database:
        database = self.database_type(self, unpack_folder(path, self.working_folder(path)), opts,
                                      ingest_s=float(meta.get("ingest_s", 0.0)),
                                      index_create_s=float(meta.get("index_create_s", 0.0)),
                                      key_digests=dict(meta.get("row_keys") or {}))
        database.reopen()
        return database

    def meta(self, native: Database) -> dict:
        return native.meta()

    def run_metrics(self, native: Database) -> dict[str, float]:
        return native.run_metrics()

    def close(self, native: Database) -> None:
        native.close()

    def bare(self, native: Database, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return native.bare(queries, k, setting, threads)

    def results(self, found, k: int):
        return top_k_arrays([ids for ids, _ in found], [scores for _, scores in found], k)

    def search_filtered(self, native: Database, queries: np.ndarray, k: int, setting: Mapping, threads: int,
                        row_filter: RowFilter, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each query by the engine's own condition on the keys stored with the rows (`filter_mode` says how)."""
        native.check_keys(row_filter)
        found = native.bare_filtered(queries, k, setting, threads, [row_filter.where(int(q)) for q in query_ids])
        return DatabaseMethod.results(self, found, k)

    def filter_plan(self, native: Database, queries: np.ndarray, k: int, row_filter: RowFilter) -> str | None:
        """The engine's plans for a sample of the queries, each distinct plan with how many of them it served."""
        plans = [native.plan(queries[q], k, self.query_setting(native.opts), row_filter.where(q))
                 for q in range(min(PLAN_SAMPLE, len(queries)))]
        counted = Counter(plan for plan in plans if plan)
        return "; ".join(f"{plan} ({count} of {len(plans)} queries)" for plan, count in counted.most_common()) or None
