"""DuckDB's vss extension: an HNSW index (USearch inside DuckDB) over a FLOAT[dim] column, metric 'ip', searched in
SQL by `ORDER BY array_negative_inner_product(embedding, query) LIMIT k` (the plan's HNSW_INDEX_SCAN). Embedded: the
database is one file, opened in this process. The extension comes from the `duckdb-ext-vss` wheel (no download at
run time: `INSTALL vss` fetches from the internet), which matches exactly one DuckDB release, hence DuckDB's pin.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TYPE_CHECKING

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS
from imgret.index.databases import Database, DatabaseMethod, GraphSettings

if TYPE_CHECKING:  # annotations only: imgret.index.methods imports the index package
    from imgret.index.methods import MethodSettings

DATABASE_FILE = "vectors.duckdb"


def extension_directory() -> Path:
    return Path(importlib.util.find_spec("duckdb_ext").submodule_search_locations[0]) / "extensions"


@dataclass
class DuckdbDatabase(Database):
    read_only: bool = False  # `handle` opened read-only (a database from the cache): nothing to write out
    dim: int = 0  # the rows' width, which its SQL names


class DuckdbHnsw(GraphSettings, DatabaseMethod):
    name, label = "duckdb_hnsw", "DuckDB vss HNSW (SQL)"
    module, also_needs, extra = "duckdb", ("duckdb_ext",), "db"
    install = "duckdb-ext-vss==1.4.4.20260205 duckdb==1.4.4"  # the last names the version its figures give
    database_type = DuckdbDatabase
    ordering = "inner product (metric 'ip', ORDER BY array_negative_inner_product)"

    def _connect(self, database: DuckdbDatabase, read_only: bool):
        duckdb = self.library()
        connection = duckdb.connect(str(database.path / DATABASE_FILE), read_only=read_only, config={
            "extension_directory": str(extension_directory()), "autoinstall_known_extensions": False,
            "autoload_known_extensions": False})
        connection.execute("LOAD vss")
        return connection

    def create_in(self, database: DuckdbDatabase, opts: MethodSettings, dim: int) -> None:
        database.handle, database.read_only = self._connect(database, read_only=False), False
        database.handle.execute("SET hnsw_enable_experimental_persistence = true")  # the index saved with the file
        database.handle.execute(f"CREATE TABLE items (id INTEGER, embedding FLOAT[{int(dim)}])")
        database.dim = int(dim)

    def ingest(self, database: DuckdbDatabase, gallery: np.ndarray) -> None:
        import pyarrow as pa

        connection, dim = database.handle, gallery.shape[1]
        for start in range(0, len(gallery), ADD_CHUNK_ROWS):
            rows = gallery[start:start + ADD_CHUNK_ROWS]
            chunk = pa.table({"id": pa.array(np.arange(start, start + len(rows)), pa.int32()),
                              "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim)})
            connection.register("chunk", chunk)
            connection.execute("INSERT INTO items SELECT id, embedding FROM chunk")
            connection.unregister("chunk")

    def create_index(self, database: DuckdbDatabase, opts: MethodSettings, threads: int) -> None:
        database.handle.execute(f"SET threads = {int(threads)}")
        database.handle.execute(f"CREATE INDEX items_hnsw ON items USING HNSW (embedding) WITH (metric = 'ip', "
                                f"M = {int(opts['hnsw_m'])}, ef_construction = {int(opts['ef_construction'])})")

    def open(self, database: DuckdbDatabase, opts: MethodSettings) -> None:
        database.handle, database.read_only = self._connect(database, read_only=True), True
        database.dim = int(database.handle.execute(
            "SELECT array_length(embedding) FROM items LIMIT 1").fetchone()[0])

    def shut(self, database: DuckdbDatabase) -> None:
        if database.handle is not None:
            if not database.read_only:
                database.handle.execute("CHECKPOINT")  # the table and its index written into the file
            database.handle.close()
            database.handle = None

    def connect(self, database: DuckdbDatabase) -> Any:
        # a connection of its own to the same database, for one thread
        return Session(database.handle.cursor(), sql(database.dim))

    def disconnect(self, session: Any) -> None:
        session.connection.close()

    def query(self, session: Any, query: np.ndarray, k: int, setting: Mapping) -> tuple[list, list]:
        if session.applied != setting:
            session.connection.execute(f"SET hnsw_ef_search = {int(setting['ef_search'])}")
            session.applied = dict(setting)
        rows = session.connection.execute(session.sql, {"query": query.tolist(), "k": k}).fetchall()
        return [row[0] for row in rows], [-row[1] for row in rows]


def sql(dim: int) -> str:
    distance = f"array_negative_inner_product(embedding, $query::FLOAT[{dim}])"
    return f"SELECT id, {distance} FROM items ORDER BY {distance} LIMIT $k"


@dataclass
class Session:
    connection: Any
    sql: str
    applied: dict | None = None  # the query setting this session last set


METHODS = (DuckdbHnsw(),)
